import pytest

from dlmc.generation import default_model_dir


@pytest.fixture(scope="session")
def default_model_state():
    """The embedded default model's weights, by canonical name (layers.N.mlp.down_proj.weight, ...)."""
    from dlmc.models import load_model

    return {k: v.detach() for k, v in load_model(default_model_dir()).state_dict().items()}
