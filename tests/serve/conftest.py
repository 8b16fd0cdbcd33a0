"""Servers for the serve tests: the embedded model, run in-process by uvicorn on a free port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn

from dlmc.generation import default_model_dir
from dlmc.models import load_model
from dlmc.serve import ServedModel, ServeSettings, create_app
from dlmc.tokenizer import load_tokenizer

NAME = "default_model"


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded model, loaded once."""
    return load_model(default_model_dir()), load_tokenizer(default_model_dir())


@pytest.fixture
def served(embedded) -> ServedModel:
    model, tokenizer = embedded
    return ServedModel(model, model.spec, tokenizer, {}, NAME, max_batch=8)


@contextmanager
def running(served: ServedModel, **settings):
    """A server on 127.0.0.1 in a thread; yields its base url."""
    app = create_app(served, ServeSettings(log_level="warning", **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class Gate:
    """Wraps a ServedModel's run so that the first batch waits until `open()`: requests sent
    meanwhile queue up behind it, which makes batching deterministic to test."""

    def __init__(self, served: ServedModel):
        self.entered, self.released = threading.Event(), threading.Event()
        self.batches: list[int] = []
        run = served.run

        def gated(prompts, key, on_canvas=None):
            self.batches.append(len(prompts))
            self.entered.set()
            self.released.wait(30)
            return run(prompts, key, on_canvas)

        served.run = gated

    def open(self) -> None:
        self.released.set()
