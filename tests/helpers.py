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


class MarginRecorder:
    """An eager model wrapped to record how far the decisions of a block decoder (LLaDA's) are from a
    tie: over the masked positions of the current block of every row, the smallest top-2 logit gap and
    the smallest gap between top-1 probabilities (the confidences the decoder ranks). Token identity
    between two paths that compute the same maths with other kernels is only promised when both gaps
    clear the rounding tolerance. Without a block length (other decoders rank otherwise) it records the
    logit gap of every row that predicts a mask, and no confidence gap."""

    def __init__(self, model, gen_length: int | None = None, block_length: int | None = None):
        self.model, self.spec = model, model.spec
        self.gen_length, self.block_length = gen_length, block_length
        self.device = next(model.parameters()).device
        self.logit_gap = self.confidence_gap = float("inf")
        self.scale = self.top_probability = 0.0

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.model(input_ids, attention_mask, position_ids)  # [B, L, V]
        self.scale = max(self.scale, float(logits.abs().max()))
        shift = int(self.spec.shift_logits)
        if self.block_length is None:
            masked = input_ids == self.spec.mask_token_id  # [B, L]
            deciding = masked | torch.roll(masked, -shift, dims=1) if shift else masked
            top2 = logits[deciding].topk(2, dim=-1).values  # [N, 2]
            if len(top2):
                self.logit_gap = min(self.logit_gap, float((top2[:, 0] - top2[:, 1]).min()))
            return logits
        start = input_ids.shape[1] - self.gen_length  # rows are left-padded: generation ends every row
        for b in range(len(logits)):
            masked = (input_ids[b, start:] == self.spec.mask_token_id).nonzero().squeeze(1)  # [m]
            if len(masked) == 0:
                continue
            block = int(masked[0]) // self.block_length
            in_block = masked[masked // self.block_length == block] + start - shift  # rows predicting them
            rows = logits[b, in_block]  # [n, V]
            top2 = rows.topk(2, dim=-1).values  # [n, 2]
            self.logit_gap = min(self.logit_gap, float((top2[:, 0] - top2[:, 1]).min()))
            top1 = torch.softmax(rows, dim=-1).amax(-1).sort().values  # [n]
            self.top_probability = max(self.top_probability, float(top1[-1]))
            if len(top1) > 1:
                self.confidence_gap = min(self.confidence_gap, float(top1.diff().min()))
        return logits

    def assert_clear(self, reduction: int) -> None:
        tol = rounding_tolerance(torch.float32, reduction, self.scale)
        assert self.logit_gap > 2 * tol, f"near tie in the logits ({self.logit_gap:.2g}): pick other prompts"
        if self.block_length is None:
            return
        # softmax moves a probability p by at most 2 p times the largest change of a logit
        assert self.confidence_gap > 4 * tol * self.top_probability, (
            f"near tie in confidences ({self.confidence_gap:.2g}): pick other prompts"
        )


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
