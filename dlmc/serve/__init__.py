"""`dlmc serve`: an OpenAI-compatible HTTP server over a compiled artifact or a checkpoint.

`app.py` has the routes, `worker.py` the queue and batching, `model.py` the model and the request
checks, `stream.py` the settled-prefix streaming, `chat.py` the chat rendering.
"""

from dlmc.serve.app import ServeSettings, create_app, serve
from dlmc.serve.model import ServedModel

__all__ = ["ServeSettings", "ServedModel", "create_app", "serve"]
