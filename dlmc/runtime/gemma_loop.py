"""The decode loop of a DiffusionGemma artifact: its two compiled programs driven as the reference does.

It replays `dlmc.decoding.diffusion_gemma.generate` (the oracle) on the encoder program and the fused
decoder iteration of `dlmc.capture_gemma`. The encoder program returns one call's K/V, which is appended
to the cache here (GemmaCache.extend, the reference's own: sliding layers keep sliding_window - 1). The
decoder iteration returns the next canvas (accepted samples, the rest renoised), the argmax canvas, each
row's mean entropy and the soft embedding that self-conditions the next step; the [B, C, V] logits stay in
the graph. What is left here is per row and small: the stability history, the adaptive stop, the commit
and EOS.

Randomness replays the reference exactly: each row's generator draws, in the reference's order, the
canvas's randint(0, V, (1, C)), then per step the Exp(1) variates torch.multinomial(probs [C, V], 1)
draws (the step turns them into the same sample, argmax(probs / q)) and the renoise randint(0, V, (1, C)).
Stopped and finished rows draw nothing and their outputs are ignored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlmc.decoding.common import Generation, left_pad, pad_token_id, row_generator, stop_token_ids
from dlmc.decoding.diffusion_gemma import DiffusionGemmaConfig, commit, count_canvases, temperature
from dlmc.errors import DlmcError
from dlmc.models.diffusion_gemma import GemmaCache

DECODER = "diffusion_gemma"


def check_supported(signature, decoder: str, config: DiffusionGemmaConfig) -> None:
    if decoder != DECODER:
        raise DlmcError(f"decoder: this artifact compiles the {DECODER} sampler, not {decoder}'s")


class GemmaPrograms:
    """The artifact's description of its cache (manifest "programs"."layout") and calls into its programs."""

    def __init__(self, engine):
        layout = engine.manifest["programs"]["layout"]
        self.engine = engine
        self.layer_types = tuple(layout["layer_types"])
        self.window = int(layout["sliding_window"])
        self.canvas = int(layout["canvas_length"])
        self.hidden = int(layout["hidden_size"])
        self.empty = int(layout["empty_slots"])
        self.kv = [tuple(shape) for shape in layout["kv_heads_and_dims"]]  # per layer (Hkv, D)
        self.dtype = getattr(torch, layout["dtype"])

    def empty_cache(self, batch: int) -> GemmaCache:
        device = self.engine.device
        keys = [torch.zeros(batch, h, self.window - 1 if kind == "sliding_attention" else self.empty, d,
                            dtype=self.dtype, device=device)
                for kind, (h, d) in zip(self.layer_types, self.kv, strict=True)]
        mask = torch.zeros(batch, self.empty, dtype=torch.bool, device=device)
        return GemmaCache(keys, [k.clone() for k in keys], mask, torch.zeros_like(mask, dtype=torch.long))

    def encode(self, ids, mask, positions, cache: GemmaCache) -> GemmaCache:
        if ids.shape[1] < 2:  # the program takes two tokens or more: one masked slot in front changes nothing
            ids, mask, positions = (torch.cat([t[:, :1], t], 1) for t in (ids, mask, positions))
            mask[:, 0] = False
        n = len(self.layer_types)
        out = self.engine.encoder_step(ids, mask, positions, *_flat(cache))
        return cache.extend(out[:n], out[n:], mask, positions, self.layer_types, self.window)

    def decode(self, canvas, positions, cache, soft, temp, bound, exponential, fresh):
        return self.engine.run_step(canvas, positions, *_flat(cache), soft, temp, bound, exponential, fresh)


def _flat(cache: GemmaCache) -> tuple[torch.Tensor, ...]:
    return (cache.mask, cache.positions, *cache.keys, *cache.values)


def generate(
    engine,
    prompts: list[list[int]],
    config: DiffusionGemmaConfig,
    seed: int = 0,
    on_step: Callable | None = None,
) -> Generation:
    programs = GemmaPrograms(engine)
    spec, device = engine.spec, engine.device
    C, V, B = programs.canvas, spec.vocab_size, len(prompts)
    if B > engine.signature.batch[1]:
        raise DlmcError(f"{B} prompts exceed this artifact's largest batch {engine.signature.batch[1]}")
    canvases = count_canvases(spec, prompts, config, C)
    eos = torch.tensor(stop_token_ids(spec, config.eos_token_ids), dtype=torch.long, device=device)
    pad = spec.pad_token_id
    generators = [row_generator(seed, device) for _ in range(B)]
    ids, mask, positions = left_pad([torch.tensor(p, device=device) for p in prompts], pad_token_id(spec))
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    cache = programs.encode(ids, mask, positions, programs.empty_cache(B))
    next_pos = torch.tensor([len(p) for p in prompts], device=device)  # [B] first canvas position per row
    out = torch.full((B, canvases * C), pad if pad is not None else pad_token_id(spec), dtype=torch.long)
    bound = torch.tensor([config.entropy_bound], dtype=torch.float32, device=device)
    finished, nfe, row_nfe = [False] * B, 0, [0] * B
    for c in range(canvases):
        live = [b for b in range(B) if not finished[b]]
        canvas = torch.zeros(B, C, dtype=torch.long, device=device)  # finished rows run on a dummy canvas
        for b in live:
            canvas[b] = torch.randint(0, V, (1, C), generator=generators[b], device=device)[0]
        argmax = canvas.clone()
        history = torch.full((B, config.stability_threshold, C), -1, dtype=torch.long, device=device)
        done = [False] * B
        canvas_pos = next_pos[:, None] + torch.arange(C, device=device)  # [B, C]
        soft = torch.zeros(B, C, programs.hidden, dtype=programs.dtype, device=device)  # no self-conditioning yet
        for steps_left in range(config.max_denoising_steps, 0, -1):
            active = [b for b in live if not done[b]]
            if not active:
                break
            exponential = torch.ones(B, C, V, device=device)  # [B, C, V]; inactive rows: any positive value
            fresh = torch.zeros(B, C, dtype=torch.long, device=device)  # [B, C]
            for b in active:
                exponential[b].exponential_(1, generator=generators[b])
                fresh[b] = torch.randint(0, V, (1, C), generator=generators[b], device=device)[0]
            temp = temperature(config, steps_left).reshape(1).to(device)
            new_canvas, new_argmax, mean_entropy, soft = programs.decode(
                canvas, canvas_pos, cache, soft, temp, bound, exponential, fresh)
            nfe += 1
            for b in active:
                canvas[b], row_nfe[b] = new_canvas[b], row_nfe[b] + 1
                if config.stability_threshold == 0:
                    stable = True
                else:
                    stable = bool((history[b] == new_argmax[b]).all())
                    history[b] = torch.cat([history[b, 1:], new_argmax[b][None]])
                argmax[b] = new_argmax[b]
                done[b] = stable and float(mean_entropy[b]) < config.confidence_threshold
            if on_step is not None:
                on_step(nfe, sum(C * c + C * done[b] for b in live))
        commit(argmax, live, eos, pad, out[:, c * C : (c + 1) * C], finished)
        if all(finished) or c == canvases - 1:
            break
        cache = programs.encode(argmax, torch.ones_like(argmax, dtype=torch.bool), canvas_pos, cache)
        next_pos = next_pos + C
    return Generation(out[:, : config.max_new_tokens].tolist(), nfe, row_nfe)
