"""Train dlmc's embedded default model: a small LLaDA-format masked diffusion model on the synthetic
tasks of dlmc.tasks, with its own character-level tokenizer.

    python scripts/train_default_model.py --out dlmc/data/default_model

Deterministic for a given seed and step count (one process, fixed thread count). On a 2-core CPU the
default settings take about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from dlmc import tasks
from dlmc.models import llada
from dlmc.models.transformer import ArchConfig, DiffusionLM
from dlmc.spec import DenoiserSpec
from dlmc.testing.fixtures import llada_config

SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|eot_id|>", "<|mdm_mask|>", "<|unk|>"]
CHARS = " 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:+-=*/,.?!'\"()"
EOS, MASK = 0, 3
GEN_LENGTH = 128
MAX_LENGTH = 256


def build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return tok


def batch(rng: random.Random, tok: Tokenizer, size: int, banned: set[str]):
    """Left-padded prompts followed by the answer and EOS up to GEN_LENGTH, as the decoder lays them out."""
    rows, prompt_lens = [], []
    while len(rows) < size:
        ex = tasks.sample(rng)
        if ex.prompt in banned:
            continue
        p = tok.encode(ex.prompt, add_special_tokens=False).ids
        a = tok.encode(ex.answer, add_special_tokens=False).ids
        rows.append((p, a + [EOS] * (GEN_LENGTH - len(a))))
        prompt_lens.append(len(p))
    width = max(prompt_lens)
    ids = torch.full((size, width + GEN_LENGTH), EOS, dtype=torch.long)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, width - len(p) : width] = torch.tensor(p)
        ids[i, width:] = torch.tensor(r)
        real[i, width - len(p) :] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    return ids, real, positions, width


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("dlmc/data/default_model"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=200)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    vocab = 96  # embedding rows, padded above the tokenizer's size
    config = llada_config(
        hidden=args.hidden, layers=args.layers, heads=args.hidden // 64, kv_heads=args.hidden // 64,
        intermediate=3 * args.hidden, embedding_size=vocab, vocab_size=tok.get_vocab_size(),
        max_length=MAX_LENGTH, mask_id=MASK, eos_id=EOS,
    )
    config["rope_theta"] = 10000.0
    arch, spec = llada.read_config(config, Path("config.json"), tok.token_to_id)
    model = DiffusionLM(arch, spec)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    banned = {ex.prompt for ex in tasks.held_out()}
    start = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, real, positions, width = batch(rng, tok, args.batch, banned)
        # Mask each answer token with probability t ~ U(0, 1) per row (the masked-diffusion forward process).
        t = torch.rand(args.batch, 1)  # [B, 1]
        masked = torch.rand(args.batch, GEN_LENGTH) < t  # [B, G]
        masked[:, 0] |= ~masked.any(-1)
        noisy = ids.clone()
        noisy[:, width:][masked] = MASK
        logits = model(noisy, real, positions)[:, width:]  # [B, G, V]
        loss = F.cross_entropy(logits[masked], ids[:, width:][masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
        if step % args.save_every == 0 or step == args.steps:
            save(model, config, tok, args.out)
    print(f"trained in {time.time() - start:.0f}s", flush=True)


def save(model: DiffusionLM, config: dict, tok: Tokenizer, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {llada.published_name(n): p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config | {"torch_dtype": "float32"}, indent=2))
    tok.save(str(tmp / "tokenizer.json"))
    added = {str(tok.token_to_id(s)): {"content": s, "special": True} for s in SPECIALS}
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "bos_token": "<|startoftext|>", "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


if __name__ == "__main__":
    main()
