import os

import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter on CPU tensors. It must be chosen before the
# first kernel is jitted (dlmc.kernels jits at the first launch, so setting it here is early enough).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from dlmc.kernels import triton_available  # noqa: E402

needs_triton = pytest.mark.skipif(
    not triton_available(), reason="triton is not installed (pip install 'dlmc[kernels]')"
)


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU when there is one, else CPU tensors through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
