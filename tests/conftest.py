import os

import pytest
import torch

from dlmc.testing.fixtures import FAMILIES, MOE_FAMILIES, write_checkpoint

# The test models are tiny: a second intra-op thread only adds synchronisation (10-50x slower per op
# when anything else runs on the two cores). scripts/portability.sh sets DLMC_TEST_THREADS=2 to check
# that no test depends on the single-threaded kernels.
torch.set_num_threads(int(os.environ.get("DLMC_TEST_THREADS", "1")))

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the setting when
# triton.language is first imported (dlmc.passes imports the kernel modules), so it is set before any test
# module is collected; the kernel ops still run their reference on CPU unless a test sets DLMC_TRITON_CPU=1.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, object]:
    """One tiny random checkpoint per family, in its published format."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint(family, root / family, seed=i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory) -> dict[str, object]:
    """One tiny random checkpoint per mixture-of-experts family (3 layers: LLaDA2's first is dense). Seeds
    whose random weights never predict the mask token itself (the block decoder would then never finish)."""
    root = tmp_path_factory.mktemp("moe_checkpoints")
    seeds = {"llada_moe": 0, "llada2": 2, "sdar_moe": 2}
    return {family: write_checkpoint(family, root / family, layers=3, seed=seeds[family]) for family in MOE_FAMILIES}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
