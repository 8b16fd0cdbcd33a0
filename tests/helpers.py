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
