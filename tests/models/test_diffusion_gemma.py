"""DiffusionGemma against an independent eager formula written from the published description, read
straight from the fixture's safetensors by published name (float64, so any kernel's rounding is far below
the tolerance)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dlmc.errors import DlmcError
from dlmc.models import describe, load_model
from dlmc.models.gemma4 import rope_cos_sin
from dlmc.testing.gemma_fixtures import gemma_config, write_gemma_checkpoint
from tests.helpers import rounding_tolerance

PROMPT = [2, 10, 11, 12, 13, 14, 15]  # longer than the window (4): the sliding layers cut it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_gemma_checkpoint(tmp_path_factory.mktemp("gemma"), dtype=torch.float64)


def _weights(path):
    w = {}
    for f in sorted(path.glob("*.safetensors")):
        w |= load_file(str(f))
    return w


def rms(x, w=None):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    return y if w is None else y * w


def gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rope(x, pos, theta, rotated):
    # x: [H, L, D]; only the first `rotated` frequencies turn, normalised by the full D
    D = x.shape[-1]
    out = x.clone()
    for j in range(rotated):
        angle = pos[:, None].double() * theta ** (-2 * j / D)  # [L, 1]
        a, b = x[..., j], x[..., j + D // 2]
        out[..., j] = a * angle[:, 0].cos() - b * angle[:, 0].sin()
        out[..., j + D // 2] = b * angle[:, 0].cos() + a * angle[:, 0].sin()
    return out


def reference(w, cfg, prompt, canvas, sc=None):
    """Encoder over prompt (causal; sliding: keys within the window), then the decoder over canvas with no
    mask (sliding layers see the last window - 1 prompt keys). Returns soft-capped logits [C, V]."""
    t = cfg["text_config"]
    d, H, W = t["hidden_size"], t["num_attention_heads"], t["sliding_window"]
    E = w["model.decoder.embed_tokens.weight"]
    scale = math.sqrt(d)
    cache = []

    def layer(n, h, pos, keys_before, encoder):
        p = f"model.decoder.layers.{n}."
        full = t["layer_types"][n] == "full_attention"
        hd = t["per_layer_config"][str(n)]["head_dim"] if full else t["head_dim"]
        x = rms(h, w[p + "input_layernorm.weight"])
        L = len(h)
        q = rms((x @ w[p + "self_attn.q_proj.weight"].T).view(L, H, hd), w[p + "self_attn.q_norm.weight"])
        kr = (x @ w[p + "self_attn.k_proj.weight"].T).view(L, -1, hd)
        v = kr if full else (x @ w[p + "self_attn.v_proj.weight"].T).view(L, -1, hd)
        k = rms(kr, w[p + "self_attn.k_norm.weight"])
        v = rms(v)
        rot = hd // 8 if full else hd // 2  # proportional: a quarter of the frequencies
        theta = 1e6 if full else 1e4
        q = rope(q.transpose(0, 1), pos, theta, rot)
        k = rope(k.transpose(0, 1), pos, theta, rot)
        v = v.transpose(0, 1)
        kpos = pos
        if keys_before is not None:
            ck, cv, cpos = keys_before
            k, v, kpos = torch.cat([ck, k], 1), torch.cat([cv, v], 1), torch.cat([cpos, pos])
        k, v = k.repeat_interleave(H // k.shape[0], 0), v.repeat_interleave(H // v.shape[0], 0)
        s = q @ k.transpose(1, 2)  # scale 1.0
        if encoder:
            allowed = kpos[None, :] <= pos[:, None]
            if not full:
                allowed &= pos[:, None] - kpos[None, :] < W
        else:
            allowed = torch.ones(L, len(kpos), dtype=torch.bool)
            if not full:  # the cache keeps the last W - 1 positions
                allowed &= (kpos >= pos[0] - (W - 1))[None, :]
        a = (s.masked_fill(~allowed, -torch.inf).softmax(-1) @ v).transpose(0, 1).reshape(L, -1)
        h = h + rms(a @ w[p + "self_attn.o_proj.weight"].T, w[p + "post_attention_layernorm.weight"])
        xm = rms(h, w[p + "pre_feedforward_layernorm.weight"])
        dense = (gelu(xm @ w[p + "mlp.gate_proj.weight"].T) * (xm @ w[p + "mlp.up_proj.weight"].T))
        dense = rms(dense @ w[p + "mlp.down_proj.weight"].T, w[p + "post_feedforward_layernorm_1.weight"])
        xe = rms(h, w[p + "pre_feedforward_layernorm_2.weight"])
        routed = torch.zeros_like(h)
        for i in range(L):  # the router reads h itself
            logits = (rms(h[i]) * w[p + "router.scale"] / math.sqrt(d)) @ w[p + "router.proj.weight"].T
            probs = logits.softmax(-1)
            top = probs.topk(t["top_k_experts"])
            for prob, e in zip(top.values / top.values.sum(), top.indices.tolist()):
                gu = w[p + "experts.gate_up_proj"][e] @ xe[i]
                g, u = gu.chunk(2)
                y = w[p + "experts.down_proj"][e] @ (gelu(g) * u)
                routed[i] += y * prob * w[p + "router.per_expert_scale"][e]
        routed = rms(routed, w[p + "post_feedforward_layernorm_2.weight"])
        h = h + rms(dense + routed, w[p + "post_feedforward_layernorm.weight"])
        scalar = w[f"model.encoder.language_model.layers.{n}.layer_scalar"] if encoder else w[p + "layer_scalar"]
        return h * scalar

    # the encoder's cache: each layer's normed, rotated k and v of the prompt
    h = E[torch.tensor(prompt)] * scale
    pos = torch.arange(len(prompt))
    enc_kv = []
    for n in range(len(t["layer_types"])):
        enc_kv.append(_kv(w, t, n, h, pos))
        h = layer(n, h, pos, None, True)
    e = E[canvas] * scale
    if sc is not None:
        s = "model.decoder.self_conditioning."
        soft = rms(sc.softmax(-1) @ E * scale, w[s + "pre_norm.weight"])
        mlp = gelu(soft @ w[s + "gate_proj.weight"].T) * (soft @ w[s + "up_proj.weight"].T)
        e = e + mlp @ w[s + "down_proj.weight"].T
    h = rms(e)
    cpos = torch.arange(len(prompt), len(prompt) + len(canvas))
    for n in range(len(t["layer_types"])):
        h = layer(n, h, cpos, enc_kv[n] + (pos,), False)
    logits = rms(h, w["model.decoder.norm.weight"]) @ E.T
    return torch.tanh(logits / 30) * 30


def _kv(w, t, n, h, pos):
    p = f"model.decoder.layers.{n}."
    full = t["layer_types"][n] == "full_attention"
    hd = t["per_layer_config"][str(n)]["head_dim"] if full else t["head_dim"]
    x = rms(h, w[p + "input_layernorm.weight"])
    kr = (x @ w[p + "self_attn.k_proj.weight"].T).view(len(h), -1, hd)
    v = kr if full else (x @ w[p + "self_attn.v_proj.weight"].T).view(len(h), -1, hd)
    k = rope(rms(kr, w[p + "self_attn.k_norm.weight"]).transpose(0, 1), pos, 1e6 if full else 1e4,
             hd // 8 if full else hd // 2)
    return k, rms(v).transpose(0, 1)


def _run(model, prompt, canvas, sc=None):
    ids = torch.tensor([prompt])
    cache = model.encode(ids, torch.ones_like(ids, dtype=torch.bool), torch.arange(len(prompt))[None],
                         model.empty_cache(1, "cpu"))
    pos = torch.arange(len(prompt), len(prompt) + len(canvas))[None]
    return model.denoise(canvas[None], pos, cache, None if sc is None else sc[None])[0]


def test_encoder_and_decoder_match_the_eager_formula(ckpt):
    model = load_model(ckpt)
    w, cfg = _weights(ckpt), json.loads((ckpt / "config.json").read_text())
    canvas = torch.tensor([20, 21, 22, 23, 24, 25, 26, 27])
    expected = reference(w, cfg, PROMPT, canvas)
    actual = _run(model, PROMPT, canvas)
    tol = rounding_tolerance(torch.float64, 64, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)
    # self-conditioning on the previous step's logits
    sc = actual / 0.7
    torch.testing.assert_close(_run(model, PROMPT, canvas, sc), reference(w, cfg, PROMPT, canvas, sc), atol=tol, rtol=0)


def test_encoder_and_decoder_scalars_are_each_modes_own(ckpt):
    model = load_model(ckpt)
    w = _weights(ckpt)
    layer = model.layers[0]
    assert torch.equal(layer.layer_scalar, w["model.decoder.layers.0.layer_scalar"])
    assert torch.equal(layer.encoder_layer_scalar, w["model.encoder.language_model.layers.0.layer_scalar"])
    assert not torch.equal(layer.layer_scalar, layer.encoder_layer_scalar)


def test_soft_cap_bounds_the_logits(ckpt):
    model = load_model(ckpt)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(40.0)  # large raw logits
    logits = _run(model, PROMPT, torch.arange(8))
    assert logits.dtype == torch.float64 and float(logits.abs().max()) < 30.0
    assert float(logits.abs().max()) > 25.0


def test_proportional_rope_turns_only_the_first_quarter():
    cos, sin = rope_cos_sin(torch.tensor([[3]]), 16, 1e6, 0.25, torch.float64)  # [1, 1, 1, 16]
    turned = sin[0, 0, 0] != 0
    assert turned.tolist() == [True, True] + [False] * 6 + [True, True] + [False] * 6
    assert torch.allclose(cos[0, 0, 0, 1], torch.tensor(3 * 1e6 ** (-2 / 16), dtype=torch.float64).cos())


def test_the_converter_prefix_loads_too(tmp_path):
    path = write_gemma_checkpoint(tmp_path, prefix="model.encoder.language_model.")
    model = load_model(path)
    w = _weights(path)
    assert torch.equal(model.layers[1].layer_scalar, w["model.encoder.language_model.layers.1.layer_scalar"])
    assert torch.equal(model.embed_tokens.weight, w["model.encoder.language_model.embed_tokens.weight"])


def test_inspect_notes_the_skipped_vision_tensors(ckpt):
    info = describe(ckpt)
    assert info["family"] == "diffusion_gemma" and info["mask_token_id"] is None
    assert info["note"] == "text only: 2 vision tensors skipped"


def _edit(tmp_path, change):
    path = write_gemma_checkpoint(tmp_path)
    config = json.loads((path / "config.json").read_text())
    change(config)
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("canvas_length"), "missing field 'canvas_length'"),
        (lambda c: c["text_config"]["layer_types"].pop(), "'layer_types' has 2 entries, 'num_hidden_layers' is 3"),
        (lambda c: c["text_config"].update(sliding_window=0), "'sliding_window' must be an integer >= 1, got 0"),
    ],
)
def test_bad_config_is_one_line(tmp_path, change, message):
    with pytest.raises(DlmcError, match=message):
        load_model(_edit(tmp_path, change))


def test_a_sliding_layer_without_v_proj_is_one_line(tmp_path):
    path = write_gemma_checkpoint(tmp_path, drop=("model.decoder.layers.0.self_attn.v_proj.weight",))
    with pytest.raises(DlmcError, match="missing tensor 'model.decoder.layers.0.self_attn.v_proj.weight'"):
        load_model(path)


def test_fixture_config_is_the_published_shape():
    config = gemma_config()
    assert config["architectures"] == ["DiffusionGemmaForBlockDiffusion"]
    assert config["text_config"]["per_layer_config"] == {"2": {"head_dim": 16, "num_key_value_heads": 1}}


def test_cli_inspect_and_run(ckpt):
    from typer.testing import CliRunner

    from dlmc.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", str(ckpt)])
    assert shown.exit_code == 0 and "diffusion_gemma" in shown.output and "vision tensors skipped" in shown.output
    ran = runner.invoke(app, ["run", str(ckpt), "--prompt", "hi", "--gen-length", "8", "--json"])
    assert ran.exit_code == 0, ran.output
    assert len(json.loads(ran.output.strip().splitlines()[-1])["output_ids"]) == 8
