import torch


def padded_batch(lengths: list[int], total: int, vocab: int = 250) -> tuple[torch.Tensor, ...]:
    """Left-padded rows of the given real lengths, with logical positions."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (len(lengths), total), generator=generator)  # [B, L] int64
    attention_mask = torch.zeros(len(lengths), total, dtype=torch.bool)  # [B, L] bool
    for b, n in enumerate(lengths):
        attention_mask[b, total - n :] = True
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L] int64
    return input_ids, attention_mask, position_ids
