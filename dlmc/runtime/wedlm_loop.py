"""The decode loop of a fused WeDLM artifact: streaming parallel decoding, batch state on device.

It replays `dlmc.decoding.wedlm.generate` (the oracle) on a step built by `fuse_decode {decoder: wedlm}`:
the step runs the output head on each row's window masks only and decides itself which masks to fill
(`dlmc.passes.wedlm_pick`), handing back tokens and fill flags [B, K], never logits. What stays here is
the window's bookkeeping, all as tensors over the batch:

* every row lives in its own logical coordinates in one buffer [B, T + 1] (T the longest prompt plus
  max_new_tokens; column T takes writes that go nowhere): the committed text in [0, C), the window in
  [C, C + N), a flag per column saying whether a window slot is filled;
* refill, the topological reordering (committed, then the window's filled slots, then its masks, each
  in logical order, by one stable sort of a category key) and the right-aligned, left-padded input;
* the prefix commit (up to and including a stop token), before the step: it decides whether the row
  fills this step, hence whether it draws. The sampled rows draw Exp(1) variates of the reference's
  shape [M, V] from their own generators (what torch.multinomial draws), so sampling replays the
  reference at any temperature.

With the exact K/V cache (`causal_cache`) the committed text's K/V are final (causal attention: a
column sees only the columns before it, and the committed text never changes). They are written in place
into a buffer [layers, B, H, T + 1, D] (`dlmc.runtime.kv_buffer`) as the prefix commits: the step that
commits the leading filled slots computed them right after the committed text, in logical order, so their
K/V are already those of committed tokens. Each step then runs only the window's rows (reordered) against
the buffer; the first step runs the prompt too. Uncached, every step runs each row's whole input.

Rows leave the batch when they finish (length or stop token), and their cache slots with them. The loop
reads back the widest query and the most masks once per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlmc.decoding.common import Generation, fill_token_id, pad_token_id, row_generator, stop_token_ids
from dlmc.decoding.wedlm import WeDLMConfig, validate
from dlmc.errors import DlmcError
from dlmc.runtime.kv_buffer import CommittedKV


def check_supported(signature, decoder: str, config: WeDLMConfig) -> None:
    """One line naming the first decoder setting this fused step cannot run."""
    if decoder != "wedlm":
        raise DlmcError(f"decoder: this artifact fuses the wedlm decoder's rule, not {decoder}'s")
    if config.temperature > 0 and "noise" not in signature.names:
        raise DlmcError(f"temperature={config.temperature}: this artifact decodes at temperature 0 only; "
                        "compile it with fuse_decode {decoder: wedlm, gumbel: true} to sample")
    cache = signature.cache
    if cache is not None and cache["policy"] != "exact":
        raise DlmcError(f"this artifact's {cache['policy']} cache has no fused wedlm loop; it runs with causal_cache")


def generate(
    engine,
    prompts: list[list[int]],
    config: WeDLMConfig,
    seed: int = 0,
    on_step: Callable | None = None,
    on_canvas: Callable | None = None,
) -> Generation:
    """`on_step` and `on_canvas` as the reference decoder calls them (`dlmc.decoding.common`)."""
    spec, sig, device = engine.spec, engine.signature, engine.device
    check_supported(sig, "wedlm", config)
    validate(spec, prompts, config)
    if len(prompts) > sig.batch[1]:
        raise DlmcError(f"prompts: {len(prompts)} rows exceed this artifact's largest batch ({sig.batch[1]})")
    mask, G, pad = spec.mask_token_id, config.max_new_tokens, pad_token_id(spec)
    B = len(prompts)
    P = torch.tensor([len(p) for p in prompts], device=device)  # [B] prompt lengths
    T = int(P.max()) + G  # logical columns; column T is the dump
    x = torch.full((B, T + 1), mask, dtype=torch.long, device=device)  # [B, T + 1]: tokens by logical position
    for b, prompt in enumerate(prompts):
        x[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    filled = torch.zeros(B, T + 1, dtype=torch.bool, device=device)  # [B, T + 1]: a filled window slot
    col = torch.arange(T + 1, device=device)  # [T + 1]
    committed = P.clone()  # [B]: C, the prompt and the committed tokens
    width = torch.full((B,), min(config.window_size, G), dtype=torch.long, device=device)  # [B]: N, window slots
    limit = P + G  # [B]: no window slot goes past it
    done = torch.zeros(B, dtype=torch.bool, device=device)  # [B]
    row_nfe = torch.zeros(B, dtype=torch.long, device=device)  # [B]
    cached = torch.zeros(B, dtype=torch.long, device=device)  # [B]: leading columns read from the cache
    cache = CommittedKV(sig, B, T, device) if sig.cache is not None else None
    stops = torch.tensor(stop_token_ids(spec, config.stop_token_ids), dtype=torch.long, device=device)  # [S]
    generators = [row_generator(seed, device) for _ in prompts]
    rule = _Rule(sig, config, device)
    nfe = 0
    while len(active := (~done).nonzero().squeeze(1)):  # [A]
        xa, fa, C, N = x[active], filled[active], committed[active], width[active]  # [A, T + 1] x2, [A] x2
        lead = _leading_filled(fa, C, N, col)  # [A]
        N = N + torch.minimum(lead, limit[active] - C - N)  # refill: a mask per slot about to be committed
        in_window = (col >= C[:, None]) & (col < (C + N)[:, None])  # [A, T + 1]
        # topological order: committed (0), filled window slots (1), masks (2), each in logical order
        key = torch.where(col < C[:, None], 0, torch.where(in_window, 2 - fa.long(), 3))  # [A, T + 1]
        order = torch.sort(key, dim=1, stable=True).indices  # [A, T + 1]: logical column of each input slot
        n, start = C + N, cached[active]  # [A] each: input lengths, input slots read from the cache
        M = N - (fa & in_window).sum(1)  # [A]: masks, the input's last M slots
        L, K = max(int((n - start).max()), sig.seq[0]), max(int(M.max()), 1)  # the one read-back per step
        # right-aligned queries: input slot of each column, < start for the left padding
        at = start[:, None] + torch.arange(L, device=device) - (L - n + start)[:, None]  # [A, L]
        real = at >= start[:, None]
        positions = torch.where(real, order.gather(1, at.clamp(min=0)), 0)  # [A, L] logical positions
        input_ids = torch.where(real, xa.gather(1, positions), pad)  # [A, L]
        k = torch.arange(K, device=device)  # [K]
        is_mask = k < M[:, None]  # [A, K]
        head_rows = (L - M[:, None] + k).clamp(max=L - 1)  # [A, K]: the masks' columns
        slots = torch.where(is_mask, positions.gather(1, head_rows), -1)  # [A, K]

        # commit the leading filled slots up to and including a stop token; it decides who fills (draws)
        ready = (col >= C[:, None]) & (col < (C + lead)[:, None])  # [A, T + 1]
        first_stop = torch.where(torch.isin(xa, stops) & ready, col, T + 1).amin(1)  # [A]: T + 1 when none
        take = torch.minimum(lead, first_stop + 1 - C)  # [A]
        finished = (first_stop <= T) | (C + take - P[active] >= G)  # [A]
        fills = ~finished & (M > 0)  # [A]: the rows the reference fills (and draws for) this step

        inputs = (input_ids, real, positions)
        if cache is not None:
            inputs += cache.inputs(active, start)
        tokens, fill, _, *kv_out = engine.run_step(*inputs, head_rows, slots,
                                                   *rule(active, fills, M, K, generators))  # [A, K] each
        nfe += 1
        row_nfe[active] += 1
        C, N = C + take, torch.where(finished, 0, N - take)
        if cache is not None:  # the committed columns this step computed (prompt, leading filled slots)
            cache.write(positions, real & (positions < C[:, None]), *kv_out)
            cached[active] = C
        target = torch.where(fill & is_mask & fills[:, None], slots, T)  # [A, K]: filled slots, else the dump
        x[active] = xa.scatter(1, target, tokens)
        filled[active] = fa.scatter(1, target, True)
        committed[active], width[active], done[active] = C, N, finished
        if on_step is not None:
            on_step(nfe, int((committed - P).sum()))
        if on_canvas is not None:
            on_canvas(_canvas(x, filled, committed, width, P, G, stops, mask, col))  # [B, G]
    out = torch.where(col < committed[:, None], x, fill_token_id(spec))  # [B, T + 1]
    outputs = out.gather(1, P[:, None] + torch.arange(G, device=device))  # [B, G]
    return Generation(outputs.tolist(), nfe, row_nfe.tolist())


def _leading_filled(filled: torch.Tensor, C: torch.Tensor, N: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """[R]: how many window slots from its start are filled (filled [R, T + 1], window [C, C + N))."""
    window = (col >= C[:, None]) & (col < (C + N)[:, None])  # [R, T + 1]
    first_mask = torch.where(window & ~filled, col, (C + N)[:, None]).amin(1)  # [R]
    return first_mask - C


def _canvas(x, filled, committed, width, P, G: int, stops, mask: int, col) -> torch.Tensor:
    """Every row's generated region [B, G]: the committed tokens, then the window's leading filled slots
    up to and including a stop token (the next step commits exactly these), masks after."""
    lead = _leading_filled(filled, committed, width, col)  # [B]: 0 for a finished row (no window)
    ready = (col >= committed[:, None]) & (col < (committed + lead)[:, None])  # [B, T + 1]
    first_stop = torch.where(torch.isin(x, stops) & ready, col, x.shape[1]).amin(1)  # [B]
    end = torch.minimum(committed + lead, first_stop + 1)  # [B]
    shown = torch.where(col < end[:, None], x, mask)  # [B, T + 1]
    return shown.gather(1, P[:, None] + torch.arange(G, device=x.device))


class _Rule:
    """The fill rule's inputs after head_rows and slots: pos_penalty and the threshold (-inf for none:
    one mask per step), then if the step samples the draws [A, K, V] (each filling row's Exp(1) variates
    in its first M rows, from its own generator in the reference's shape and dtype; ones elsewhere and
    at temperature 0), the temperature and the filters (off: top_k = V, top_p = inf; the reference
    applies them only when it samples, and top-p only below 1)."""

    def __init__(self, sig, config: WeDLMConfig, device):
        threshold = config.entropy_threshold if config.entropy_threshold is not None else float("-inf")
        self.fixed = (torch.tensor([config.pos_penalty], dtype=torch.float64, device=device),
                      torch.tensor([threshold], dtype=torch.float64, device=device))
        self.sampling = "noise" in sig.names
        self.temperature = config.temperature
        if not self.sampling:
            return
        spec = sig.inputs[sig.names.index("noise")]
        self.vocab, self.dtype = spec.shape[-1], getattr(torch, spec.dtype)
        top_p = config.top_p if config.top_p is not None and config.top_p < 1 else float("inf")
        self.fixed += (
            torch.tensor([config.temperature], dtype=torch.float64, device=device),
            torch.tensor([min(config.top_k or self.vocab, self.vocab)], dtype=torch.long, device=device),
            torch.tensor([top_p], dtype=torch.float64, device=device),
        )

    def __call__(self, active, fills, M, K: int, generators) -> tuple[torch.Tensor, ...]:
        if not self.sampling:
            return self.fixed
        noise = torch.ones(len(active), K, self.vocab, dtype=self.dtype, device=active.device)  # [A, K, V]
        if self.temperature > 0:
            for a in fills.nonzero().squeeze(1).tolist():
                g, m = generators[int(active[a])], int(M[a])
                draws = torch.empty(m, self.vocab, dtype=self.dtype, device=g.device)  # [M, V]: multinomial's shape
                noise[a, :m] = draws.exponential_(1, generator=g)
        pos_penalty, threshold, *sampling = self.fixed
        return (pos_penalty, threshold, noise, *sampling)
