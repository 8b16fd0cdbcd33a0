"""Checkpoints whose linears bitsandbytes stored (int8, nf4, fp4, double quant) load as float models.

The real-format tests build the checkpoint with bitsandbytes' own modules and compare against its own
dequantization; the hand-computed and bad-input tests need no bitsandbytes."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmc.models import describe, load_model, read_model_config
from dlmc.models.transformer import DiffusionLM
from dlmc.models.bnb import decode_4bit, decode_int8, decode_nested_absmax, unpack_high_first
from dlmc.quant.formats import rtn
from dlmc.testing.fixtures import write_checkpoint
from tests.helpers import edit_config, expect_error

# (bnb_4bit_quant_type or "int8", double quant)
KINDS = {"int8": ("int8", False), "nf4": ("nf4", False), "nf4-dq": ("nf4", True), "fp4": ("fp4", False),
         "fp4-dq": ("fp4", True)}
HEADS = ("model.transformer.ff_out.weight", "lm_head.weight")  # llm_int8_skip_modules keeps them in float
# Every row a whole number of 64-element blocks: bitsandbytes 0.50.2's CPU dequantize_4bit kernel (our
# oracle here) decodes rows that split a block wrongly (see test_blocks_run_across_rows).
INTERMEDIATE = 128


def published(path):
    weights = {}
    for shard in sorted(path.glob("*.safetensors")):
        weights |= load_file(shard)
    return weights


def linear_names(weights, skip=HEADS):
    return [n for n, w in weights.items() if w.ndim == 2 and "embed" not in n and "wte" not in n and n not in skip]


def quantization_config(kind, compute_dtype="float32"):
    """config.json's quantization_config as transformers' BitsAndBytesConfig.to_dict() writes it."""
    quant_type, double_quant = KINDS[kind]
    eight = quant_type == "int8"
    return {
        "_load_in_4bit": not eight,
        "_load_in_8bit": eight,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "fp4" if eight else quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": not eight,
        "load_in_8bit": eight,
        "quant_method": "bitsandbytes",
    }


def write_shards(path, tensors, shards=2):
    """Round-robin over shards, so a weight's companions often sit in another shard than the weight."""
    parts = [{} for _ in range(shards)]
    for i, (name, tensor) in enumerate(tensors.items()):
        parts[i % shards][name] = tensor.contiguous()
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map |= {name: fname for name in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def bnb_checkpoint(family, path, kind, dtype=torch.float32, compute_dtype="float32", skip=HEADS):
    """A fixture checkpoint whose linears (all but the output head) bitsandbytes quantized, saved the way
    transformers saves them; returns (path, the float weights bitsandbytes itself dequantizes to)."""
    bnb = pytest.importorskip("bitsandbytes")
    write_checkpoint(family, path, dtype=dtype, intermediate=INTERMEDIATE)
    weights = published(path)
    quant_type, double_quant = KINDS[kind]
    stored, expected = {}, {}
    linears = linear_names(weights, skip)
    for name, w in weights.items():
        if name not in linears:
            stored[name] = w
            continue
        out_features, in_features = w.shape
        if quant_type == "int8":
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type=quant_type,
                                      compress_statistics=double_quant, compute_dtype=getattr(torch, compute_dtype))
        layer.load_state_dict({"weight": w}, strict=False)
        layer = layer.to("cpu")  # bitsandbytes quantizes on the move to a device
        state = layer.state_dict(prefix=name.removesuffix("weight"))
        stored |= state
        if quant_type == "int8":
            scb = state[name.removesuffix("weight") + "SCB"]
            expected[name] = bnb.functional.int8_vectorwise_dequant(state[name], scb)
        else:
            expected[name] = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    write_shards(path, stored)
    edit_config(path, quantization_config=quantization_config(kind, compute_dtype))
    return path, expected


def float_twin(family, path, expected, dtype=torch.float32):
    """The same fixture checkpoint in float with bitsandbytes' dequantized weights put in."""
    write_checkpoint(family, path, dtype=dtype, intermediate=INTERMEDIATE)
    weights = published(path) | {n: w.to(dtype) for n, w in expected.items()}
    write_shards(path, weights)
    return path


# ---------------------------------------------------------------------------------------------
# real bitsandbytes checkpoints
# ---------------------------------------------------------------------------------------------


def test_bitsandbytes_state_dict_layout():
    """The format facts dlmc.models.bnb relies on, read off bitsandbytes' own modules."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(96, 64)
    int8 = bnb.nn.Linear8bitLt(64, 96, bias=False, has_fp16_weights=False)
    int8.load_state_dict({"weight": w}, strict=False)
    state = int8.to("cpu").state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.int8, (96, 64)), "SCB": (torch.float32, (96,)), "weight_format": (torch.uint8, ())}
    assert int(state["weight_format"]) == 0 and (state["weight"].abs().amax(1) == 127).all()
    nf4 = bnb.nn.Linear4bit(64, 96, bias=False, quant_type="nf4", compress_statistics=True)
    nf4.load_state_dict({"weight": w}, strict=False)
    state = nf4.to("cpu").state_dict()
    packed_json = state["weight.quant_state.bitsandbytes__nf4"]
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.uint8, (96 * 64 // 2, 1)),
        "weight.absmax": (torch.uint8, (96,)),  # 96 * 64 / 64 blocks, their absmax 8-bit coded
        "weight.quant_map": (torch.float32, (16,)),
        "weight.nested_absmax": (torch.float32, (1,)),
        "weight.nested_quant_map": (torch.float32, (256,)),
        "weight.quant_state.bitsandbytes__nf4": (torch.uint8, (len(packed_json),)),
    }
    fields = json.loads(bytes(packed_json.tolist()))
    assert fields.keys() == {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                             "nested_offset"}
    assert fields["shape"] == [96, 64] and fields["blocksize"] == 64 and fields["nested_blocksize"] == 256
    packed, _ = bnb.functional.quantize_4bit(torch.tensor([[1.0, -1.0]]), quant_type="nf4")
    assert packed.item() == 0xF0  # +1 is code 15, -1 code 0: the first element sits in the high nibble


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_decoded_weights_and_forward_match_bitsandbytes(tmp_path, family, kind):
    path, expected = bnb_checkpoint(family, tmp_path / "bnb", kind)
    model = load_model(path)
    twin = load_model(float_twin(family, tmp_path / "float", expected))
    params, twin_params = dict(model.named_parameters()), dict(twin.named_parameters())
    assert params.keys() == twin_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, twin_params[name], rtol=1e-6, atol=1e-7, msg=name)
    ids = torch.tensor([[5, 17, 99, 200, 3, 64, 255]])  # [1, L]
    torch.testing.assert_close(model(ids), twin(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blocks_run_across_rows(quant_type):
    """Blocks cover the row-major flattened weight, so a row of 96 splits a 64-element block. We decode as
    bitsandbytes' reference (PyTorch, same as its CUDA kernel) does; its 0.50.2 CPU C++ kernel assumes
    blocks inside rows and decodes such weights wrongly, further from the original than RTN error."""
    bnb = pytest.importorskip("bitsandbytes")
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    except ImportError:
        pytest.skip("bitsandbytes' reference kernel moved")
    reference = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd
    w = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    packed, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, blocksize=64)
    ours = decode_4bit(packed, state.code, state.absmax, 64, w.numel()).reshape(3, 96)
    expected = reference(packed.reshape(-1), state.absmax, state.code, 64, (3, 96), torch.float32)
    torch.testing.assert_close(ours, expected)
    assert (ours - w).abs().max() <= (bnb.functional.dequantize_4bit(packed, state) - w).abs().max()


@pytest.mark.parametrize("kind", ["int8", "nf4-dq"])
def test_quantized_output_head_decodes_too(tmp_path, kind):
    """Nothing depends on which layers were skipped: the stored tensors say what is quantized."""
    path, expected = bnb_checkpoint("sdar", tmp_path / "bnb", kind, skip=())
    assert "lm_head.weight" in expected
    model = load_model(path)
    torch.testing.assert_close(model.lm_head.weight, expected["lm_head.weight"], rtol=1e-6, atol=1e-7)


def test_dtype_is_the_compute_dtype_unless_asked(tmp_path):
    path, _ = bnb_checkpoint("llada", tmp_path / "nf4", "nf4", compute_dtype="bfloat16")
    assert {p.dtype for p in load_model(path).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_model(path, dtype=torch.float64).parameters()} == {torch.float64}
    path, _ = bnb_checkpoint("llada", tmp_path / "int8", "int8", dtype=torch.float16)
    assert {p.dtype for p in load_model(path).parameters()} == {torch.float16}  # int8: the stored floats'


def test_describe_says_the_weights_are_a_dequantization(tmp_path):
    path, _ = bnb_checkpoint("dream", tmp_path / "m", "nf4-dq", compute_dtype="bfloat16")
    info = describe(path)
    assert info["weights"] == "bitsandbytes nf4 (double quant), dequantized to bfloat16 on load"
    assert info["dtype"] == "bfloat16"
    assert "weights" not in describe(write_checkpoint("dream", tmp_path / "float"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_is_lossless_through_dlmc_w8a16_rtn(tmp_path, dtype):
    """bnb row codes c with scale SCB/127 come back as the same codes, and the same scale, from dlmc's own
    W8A16 RTN (per channel, symmetric) when the model is decoded to float32 or float16."""
    path, _ = bnb_checkpoint("llada", tmp_path / "m", "int8")
    stored = published(path)
    model = load_model(path, dtype=dtype)
    for name in linear_names(stored):
        w = model.get_parameter(canonical_name(path, name))
        quantized = rtn(w.float(), bits=8, symmetric=True, group_size=w.shape[1])
        assert torch.equal(quantized.codes, stored[name].to(torch.int16)), name
        scale = stored[name.removesuffix("weight") + "SCB"] / 127
        torch.testing.assert_close(quantized.scale[:, 0], scale, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=0)


def test_int8_in_bfloat16_moves_a_few_codes_by_one():
    """Where int8 is not lossless: decoded to bfloat16 (8 significant bits), a row's largest weight 127 * s
    is rounded by up to 2^-9, so RTN's recomputed scale max|w| / 127 is off by as much and codes near a
    rounding boundary move by one. The decoded weights still hold the codes: the bnb scale recovers all."""
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))  # [out, in]
    scb = w.abs().amax(1)  # [out]
    codes = torch.round(w * (127 / scb[:, None])).to(torch.int8)  # LLM.int8's rule
    decoded = decode_int8(codes, scb).to(torch.bfloat16)
    moved = rtn(decoded.float(), bits=8, symmetric=True, group_size=256).codes - codes.to(torch.int16)
    assert moved.abs().max() == 1 and 0 < (moved != 0).float().mean() < 0.005
    assert torch.equal(torch.round(decoded.float() / (scb / 127)[:, None]).to(torch.int8), codes)


def test_int8_is_lossless_through_the_quantize_pass(tmp_path):
    """The same, end to end: the `quantize` pass with `scheme: {weights: int8}` on the captured step."""
    from dlmc.capture import CaptureConfig, capture
    from dlmc.passes.quantize import Quantize, quantize_program
    from dlmc.quant.calibration import calibration_inputs
    from dlmc.quant.scheme import Calibration, Rule, Scheme

    path, _ = bnb_checkpoint("llada", tmp_path / "m", "int8")
    stored = published(path)
    model = load_model(path)
    config = Quantize(scheme=Scheme(weights="int8"), rules=(Rule(match="lm_head", scheme=None),),
                      calibration=Calibration(source="random", samples=4, seq_len=16))
    step = capture(model, CaptureConfig(max_batch=4))
    result, _ = quantize_program(step, config, calibration_inputs(config.calibration, model.spec, path, 64))
    state = result.program.exported.state_dict
    for name in linear_names(stored):
        layer = canonical_name(path, name).removesuffix(".weight")
        assert torch.equal(state[layer + ".qweight"], stored[name]), name


def canonical_name(path, published_name):
    family, arch, spec = read_model_config(path)
    with torch.device("meta"):
        names = [n for n, _ in DiffusionLM(arch, spec).named_parameters()]
    return next(n for n in names if family.published_name(n) == published_name)


# ---------------------------------------------------------------------------------------------
# hand-computed, no bitsandbytes
# ---------------------------------------------------------------------------------------------


def test_4bit_block_decoded_by_hand():
    codebook = torch.linspace(-1, 1, 16)  # [16]
    codes = [15, 0, 8, 7, 1, 14, 3]  # n = 7: odd, and a short last block
    packed = torch.tensor([[0xF0], [0x87], [0x1E], [0x30]], dtype=torch.uint8)  # high nibble first, one pad code
    absmax = torch.tensor([2.0, 0.5])  # blocks of 4: elements 0-3, then 4-6
    expected = torch.tensor([codebook[c] * (2.0 if i < 4 else 0.5) for i, c in enumerate(codes)])
    assert unpack_high_first(packed, 7).tolist() == codes
    torch.testing.assert_close(decode_4bit(packed, codebook, absmax, 4, 7), expected)


def test_4bit_codes_stored_in_another_dtype_are_bytes():
    """bnb_4bit_quant_storage=bfloat16 keeps the same bytes under another dtype."""
    packed = torch.tensor([0xF0, 0x87], dtype=torch.uint8)
    assert unpack_high_first(packed.view(torch.bfloat16).reshape(1, 1), 4).tolist() == [15, 0, 8, 7]


def test_nested_absmax_by_hand():
    codebook = torch.linspace(-1, 1, 256)
    codes = torch.tensor([255, 0, 128], dtype=torch.uint8)  # three 4-bit blocks, nested blocks of 2
    nested = torch.tensor([0.5, 0.25])
    got = decode_nested_absmax(codes, codebook, nested, 2, 1.0)
    torch.testing.assert_close(got, torch.tensor([1 * 0.5 + 1, -1 * 0.5 + 1, codebook[128] * 0.25 + 1]))


def test_int8_by_hand():
    codes = torch.tensor([[127, -64, 0], [1, -127, 2]], dtype=torch.int8)
    scb = torch.tensor([2.54, 1.27])
    torch.testing.assert_close(decode_int8(codes, scb), torch.tensor([[2.54, -1.28, 0.0], [0.01, -1.27, 0.02]]))


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and the tensor or field
# ---------------------------------------------------------------------------------------------


def hand_checkpoint(tmp_path, kind):
    """The llada fixture with one linear (layer 0's q_proj, [64, 64]) stored by hand in the bnb format."""
    path = write_checkpoint("llada", tmp_path / "m", shards=1)
    weights = load_file(path / "model.safetensors")
    name = "model.transformer.blocks.0.q_proj.weight"
    w = weights.pop(name)
    if kind == "int8":
        scb = w.abs().amax(1)
        weights |= {name: torch.round(w * 127 / scb[:, None]).to(torch.int8), name.removesuffix("weight") + "SCB": scb,
                    name.removesuffix("weight") + "weight_format": torch.tensor(0, dtype=torch.uint8)}
    else:
        state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}
        weights |= {name: torch.full((64 * 64 // 2, 1), 0x77, dtype=torch.uint8),
                    name + ".absmax": w.reshape(64, 64).abs().amax(1),
                    name + ".quant_map": torch.linspace(-1, 1, 16),
                    name + ".quant_state.bitsandbytes__nf4": json_tensor(state)}
    save_file(weights, str(path / "model.safetensors"))
    edit_config(path, quantization_config=quantization_config(kind))
    return path, name


def json_tensor(fields):
    return torch.tensor(list(json.dumps(fields).encode()), dtype=torch.uint8)


def rewrite(path, change):
    weights = load_file(path / "model.safetensors")
    change(weights)
    save_file(weights, str(path / "model.safetensors"))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_hand_made_checkpoints_load_without_bitsandbytes(tmp_path, kind, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it now fails
    path, name = hand_checkpoint(tmp_path, kind)
    assert load_model(path).layers[0].attn.q_proj.weight.dtype == torch.float32


def test_int8_weight_without_row_scales(tmp_path):
    path, name = hand_checkpoint(tmp_path, "int8")
    rewrite(path, lambda w: w.pop(name.removesuffix("weight") + "SCB"))
    expect_error(path, "model.safetensors", f"quantized weight '{name}'", f"'{name.removesuffix('weight')}SCB'")


def test_int8_weight_in_a_gpu_tile_layout(tmp_path):
    path, name = hand_checkpoint(tmp_path, "int8")
    layout = name.removesuffix("weight") + "weight_format"
    rewrite(path, lambda w: w.update({layout: torch.tensor(2, dtype=torch.uint8)}))
    expect_error(path, "model.safetensors", f"'{layout}' is 2", "row-major")


@pytest.mark.parametrize("companion", [".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4"])
def test_4bit_weight_without_a_companion(tmp_path, companion):
    path, name = hand_checkpoint(tmp_path, "nf4")
    rewrite(path, lambda w: w.pop(name + companion))
    expect_error(path, "model.safetensors", f"quantized weight '{name}'", f"'{name}{companion}'")


def test_double_quant_without_nested_absmax(tmp_path):
    path, name = hand_checkpoint(tmp_path, "nf4")
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 64], "nested_blocksize": 256,
             "nested_dtype": "float32", "nested_offset": 0.1}
    rewrite(path, lambda w: w.update({name + ".quant_state.bitsandbytes__nf4": json_tensor(state),
                                      name + ".absmax": torch.zeros(64, dtype=torch.uint8),
                                      name + ".nested_quant_map": torch.linspace(-1, 1, 256)}))
    expect_error(path, "model.safetensors", f"'{name}.nested_absmax'")


def test_unknown_quant_type_in_quant_state(tmp_path):
    path, name = hand_checkpoint(tmp_path, "nf4")
    state = {"quant_type": "int4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}
    rewrite(path, lambda w: w.update({name + ".quant_state.bitsandbytes__nf4": json_tensor(state)}))
    expect_error(path, "model.safetensors", f"'{name}.quant_state.bitsandbytes__nf4'", "quant_type 'int4'")


def test_unknown_quant_type_in_config(tmp_path):
    path, _ = hand_checkpoint(tmp_path, "nf4")
    edit_config(path, quantization_config=quantization_config("nf4") | {"bnb_4bit_quant_type": "int2"})
    expect_error(path, "config.json", "bnb_4bit_quant_type", "'int2'")


def test_quant_state_shape_disagrees_with_the_model(tmp_path):
    path, name = hand_checkpoint(tmp_path, "nf4")
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [32, 128]}
    rewrite(path, lambda w: w.update({name + ".quant_state.bitsandbytes__nf4": json_tensor(state)}))
    expect_error(path, "model.safetensors", f"'{name}.quant_state.bitsandbytes__nf4'", "[32, 128]", "[64, 64]")


def test_packed_bytes_disagree_with_the_quant_state(tmp_path):
    path, name = hand_checkpoint(tmp_path, "nf4")
    rewrite(path, lambda w: w.update({name: torch.zeros(100, 1, dtype=torch.uint8)}))
    expect_error(path, "model.safetensors", f"'{name}'", "100 bytes", "2048")


def test_quant_state_is_not_json(tmp_path):
    path, name = hand_checkpoint(tmp_path, "nf4")
    rewrite(path, lambda w: w.update({name + ".quant_state.bitsandbytes__nf4": torch.tensor([0x80, 0x04, 0x95],
                                                                                            dtype=torch.uint8)}))
    expect_error(path, "model.safetensors", f"'{name}.quant_state.bitsandbytes__nf4'", "not a bitsandbytes quant_state")


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors"])
def test_other_quantization_methods_are_refused(tmp_path, method):
    path = write_checkpoint("llada", tmp_path / "m")
    edit_config(path, quantization_config={"quant_method": method, "bits": 4, "group_size": 128})
    expect_error(path, "config.json", f"quant_method '{method}'", "dlmc cannot load that format")


def test_companions_without_a_quantization_config_are_unexpected(tmp_path):
    path, name = hand_checkpoint(tmp_path, "int8")
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config))
    expect_error(path, "model.safetensors", "unexpected tensor", "SCB")


# ---------------------------------------------------------------------------------------------
# the CLI on a bitsandbytes checkpoint
# ---------------------------------------------------------------------------------------------


def test_cli_inspect_run_and_compile(tmp_path):
    from typer.testing import CliRunner

    from dlmc.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    path, expected = bnb_checkpoint("llada", tmp_path / "bnb", "nf4-dq")
    twin = float_twin("llada", tmp_path / "float", expected)
    inspected = invoke("inspect", path)
    assert inspected.exit_code == 0, inspected.output
    assert "bitsandbytes nf4 (double quant), dequantized to float32 on load" in inspected.output
    args = ["--prompt-ids", "5,6,7", "--gen-length", 8, "--json"]
    ran = invoke("run", path, *args)
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["output_ids"] == json.loads(invoke("run", twin, *args).stdout)["output_ids"]
    compiled = invoke("compile", path, "--recipe", "recipes/cpu-eager.yaml", "-o", tmp_path / "art")
    assert compiled.exit_code == 0, compiled.output
    from_artifact = json.loads(invoke("run", tmp_path / "art", *args).stdout)
    assert from_artifact["output_ids"] == json.loads(ran.stdout)["output_ids"]
    artifact = invoke("inspect", tmp_path / "art")  # the artifact remembers where its float weights came from
    assert "bnb (float32, bitsandbytes nf4 (double quant) dequantized on load)" in artifact.output
