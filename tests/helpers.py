import json

import pytest
import torch

from dlmc.errors import DlmcError
from dlmc.models import load_model


def padded_batch(lengths: list[int], total: int, vocab: int = 250) -> tuple[torch.Tensor, ...]:
    """Left-padded rows of the given real lengths, with logical positions."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (len(lengths), total), generator=generator)  # [B, L] int64
    attention_mask = torch.zeros(len(lengths), total, dtype=torch.bool)  # [B, L] bool
    for b, n in enumerate(lengths):
        attention_mask[b, total - n :] = True
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L] int64
    return input_ids, attention_mask, position_ids


def rounding_tolerance(dtype: torch.dtype, reduction: int, scale: float) -> float:
    """Absolute tolerance between two computations of the same maths by different kernels or layouts.

    Another summation order (blocking, vector width, a cache concatenated in front, another backend)
    moves each length-`reduction` sum by about sqrt(reduction) units of the dtype's epsilon relative to
    `scale`, the magnitude of the result; the factor 16 covers the few layers the test models stack
    and the softmaxes between them. Identical kernels on identical inputs need no tolerance: compare
    those with torch.equal."""
    return 16 * torch.finfo(dtype).eps * reduction**0.5 * scale


def assert_equal_up_to_rounding(actual: torch.Tensor, expected: torch.Tensor, reduction: int) -> None:
    """Logits [..., V] that are the same maths as `expected`: close within the rounding tolerance, and
    the same arg-max wherever the expected top-2 margin is clear of it (most rows must be clear, or the
    comparison would say nothing)."""
    tol = rounding_tolerance(expected.dtype, reduction, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)
    top2 = expected.topk(2, dim=-1).values  # [..., 2]
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tol  # [...]
    assert clear.float().mean() > 0.9, "the inputs are near ties: pick others"
    assert torch.equal(actual.argmax(-1)[clear], expected.argmax(-1)[clear])


def edit_config(path, **changes):
    """Set fields of a checkpoint's config.json; a value of None removes the field."""
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def expect_error(path, *fragments):
    """Loading the checkpoint fails with one line holding every fragment."""
    with pytest.raises(DlmcError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
