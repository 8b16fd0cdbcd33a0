"""CLI smoke tests: the scripting contract of `dlmc run`, `dlmc inspect`, `dlmc eval` and bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

from dlmc.cli import app
from dlmc.testing.fixtures import FAMILIES

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_every_family(checkpoints, family):
    result = invoke("inspect", checkpoints[family])
    assert result.exit_code == 0, result.output
    for key in ("family", "parameters", "dtype", "mask_token_id", "attention", "logits", "vocab_size", "max_length"):
        assert key in result.output
    assert family in result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_run_json_every_family(checkpoints, family):
    result = invoke("run", checkpoints[family], "--prompt", "hi", "--prompt-ids", "5,6,7", "--gen-length", 8, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(rows) == 2
    assert rows[1]["prompt_ids"] == [5, 6, 7]
    for row in rows:  # decoded together: the time is the batch's, and says so
        assert set(row) == {"prompt_ids", "output_ids", "text", "nfe", "batch_nfe", "batch_seconds", "batch_size"}
        assert len(row["output_ids"]) == 8 and 1 <= row["nfe"] <= row["batch_nfe"] and row["batch_size"] == 2


def test_run_json_names_the_seconds_of_a_prompt_decoded_alone(checkpoints):
    result = invoke("run", checkpoints["llada"], "--prompt-ids", "5,6,7", "--gen-length", 8, "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"prompt_ids", "output_ids", "text", "nfe", "seconds"}


def test_run_stop_at_eos_on_the_embedded_model():
    """The embedded model answers in a few tokens, then says EOS: with --stop-at-eos it stops after the
    block holding it, with the same answer; the default runs every step as the official sampler."""
    args = ["run", "--prompt", "add 32+96:", "--prompt", "reverse bvzwetopfy:", "--gen-length", 32,
            "--block-length", 8, "--json"]
    full, stopped = ([json.loads(line) for line in invoke(*args, *flag).stdout.splitlines()]
                     for flag in ([], ["--stop-at-eos"]))
    for a, b in zip(full, stopped, strict=True):
        assert a["text"] == b["text"] and a["text"]
        cut = a["output_ids"].index(0) + 1  # the embedded model's EOS is id 0
        assert a["output_ids"][:cut] == b["output_ids"][:cut]
        assert a["nfe"] == 32 and b["nfe"] < 32 and b["batch_nfe"] == max(row["nfe"] for row in stopped)
    assert "does not apply to the block decoder" in invoke(*args, "--stop-at-eos", "--decoder", "block").output


def test_run_llada_options(checkpoints):
    args = ["run", checkpoints["llada"], "--prompt-ids", "5,6,7", "--gen-length", 8, "--steps", 4, "--block-length", 4, "--json"]
    greedy = json.loads(invoke(*args).stdout)
    assert greedy["nfe"] == 4
    sampled = invoke(*args, "--temperature", 1.0, "--seed", 3, "--cfg-scale", 1.0, "--remasking", "random")
    assert sampled.exit_code == 0, sampled.output
    assert json.loads(sampled.stdout)["nfe"] == 8  # guidance doubles the evaluations
    fast = invoke("run", checkpoints["llada"], "--prompt-ids", "5,6,7", "--gen-length", 8, "--block-length", 4, "--threshold", 0.9, "--json")
    assert fast.exit_code == 0, fast.output


def test_run_llada2_options_reach_the_config(checkpoints):
    base = ["run", checkpoints["sdar"], "--prompt-ids", "5,6,7", "--gen-length", 8, "--json"]
    # blocks [0, 4) (one mask behind the prompt), [4, 8), [8, 12): one step each when one step fills a block
    capped = invoke(*base, "--decoder", "llada2", "--minimal-topk", 8)  # steps = min(4, 8 // 8) = 1
    assert capped.exit_code == 0, capped.output
    assert json.loads(capped.stdout)["nfe"] == 3
    fill_at_once = ["--threshold", 1.0, "--num-to-transfer", 4, "--max-post-steps", 0]
    filled = invoke(*base, "--decoder", "llada2_edit", *fill_at_once)
    assert filled.exit_code == 0, filled.output
    assert json.loads(filled.stdout)["nfe"] == 3
    edited = invoke(*base, "--decoder", "llada2_edit", "--editing-threshold", 0.5, "--eos-early-stop")
    assert edited.exit_code == 0, edited.output
    wrong = invoke(*base, "--decoder", "llada2", "--editing-threshold", 0.5)
    assert wrong.exit_code == 2 and "--editing-threshold does not apply to the llada2 decoder" in wrong.stderr
    wrong = invoke(*base, "--decoder", "block", "--eos-early-stop")
    assert wrong.exit_code == 2 and "--eos-early-stop does not apply to the block decoder" in wrong.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--steps", 3, "--gen-length", 8, "--block-length", 4], "steps"),
        (["--gen-length", 8, "--block-length", 16], "block_length"),
        (["--gen-length", 600], "max_length"),
        (["--remasking", "sideways"], "remasking"),
        (["--alg", "entropy"], "--alg"),
        (["--decoder", "nope"], "nope"),
    ],
)
def test_run_impossible_settings(checkpoints, args, fragment):
    result = invoke("run", checkpoints["llada"], "--prompt-ids", "5,6", *args)
    assert result.exit_code == 2
    assert fragment in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_prompt_longer_than_the_model(checkpoints):
    result = invoke("run", checkpoints["llada"], "--prompt", "x" * 600, "--gen-length", 8)
    assert result.exit_code == 2 and "max_length" in result.stderr


def test_bad_checkpoint_is_one_line_and_debug_shows_traceback(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Nope"]}))
    result = invoke("inspect", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'config.json'}: unknown architecture 'Nope' " + \
        "(supported: DiffusionGemmaForBlockDiffusion, DreamModel, Fast_dLLM_QwenForCausalLM, LLaDA2MoeModelLM, " + \
        "LLaDAMoEModelLM, LLaDAModelLM, " + \
        "SDARForCausalLM, SDARMoeForCausalLM, WeDLMForCausalLM)"
    debug = invoke("inspect", tmp_path, "--debug")
    assert debug.exit_code != 0 and debug.exception is not None


def test_bad_prompt_ids(checkpoints):
    result = invoke("run", checkpoints["llada"], "--prompt-ids", "1,x")
    assert result.exit_code == 2 and "--prompt-ids" in result.stderr


def test_run_default_model_text():
    result = invoke("run", "--prompt", "shift dlmcrocksz:", "--gen-length", 32, "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["text"] == "emndspdlta"
    assert row["nfe"] == 32


def test_compile_run_bench_inspect_on_the_embedded_model(tmp_path):
    from dlmc.generation import default_model_dir

    out = tmp_path / "art"
    compiled = invoke("compile", default_model_dir(), "--recipe", "recipes/cpu-eager.yaml", "-o", out)
    assert compiled.exit_code == 0, compiled.output
    assert "capture" in compiled.stderr and "save" in compiled.stderr
    args = ["--prompt", "add 123+456:", "--gen-length", 16, "--steps", 16, "--json"]
    from_artifact = json.loads(invoke("run", out, *args).stdout)
    from_checkpoint = json.loads(invoke("run", default_model_dir(), *args).stdout)
    assert from_artifact["output_ids"] == from_checkpoint["output_ids"]
    assert from_artifact["text"] == from_checkpoint["text"]
    benched = invoke("bench", out, "--prompts", 2, "--gen-length", 16, "--repeats", 1, "--json")
    assert benched.exit_code == 0, benched.output
    rows = {r["name"]: r for r in json.loads(benched.stdout)["rows"]}
    assert rows["artifact"]["agreement"] == 1.0 and rows["artifact"]["nfe"] == rows["reference"]["nfe"] == 16
    assert 0 < rows["artifact"]["step_seconds_per_step"] < rows["artifact"]["seconds_per_step"]
    assert rows["reference"]["step_seconds_per_step"] is None
    inspected = invoke("inspect", out)
    assert "fold_constants" in inspected.output and "eager" in inspected.output
    again = invoke("compile", default_model_dir(), "--recipe", "recipes/cpu-eager.yaml", "-o", out)
    assert again.exit_code == 2 and "--force" in again.stderr


def test_a_fused_artifact_runs_from_the_cli(tmp_path):
    """fuse_decode on the embedded model: `dlmc run` takes the fused loop and gives the checkpoint's tokens."""
    from dlmc.generation import default_model_dir

    recipe = tmp_path / "fused.yaml"
    recipe.write_text("passes:\n  - fold_constants: {}\n  - fuse_decode: {}\nlower: {backend: eager}\n")
    out = tmp_path / "art"
    assert invoke("compile", default_model_dir(), "--recipe", recipe, "-o", out).exit_code == 0
    args = ["--prompt", "add 123+456:", "--prompt", "count 417:", "--gen-length", 16, "--block-length", 8, "--json"]
    from_artifact = [json.loads(line) for line in invoke("run", out, *args).stdout.splitlines()]
    from_checkpoint = [json.loads(line) for line in invoke("run", default_model_dir(), *args).stdout.splitlines()]
    assert [r["output_ids"] for r in from_artifact] == [r["output_ids"] for r in from_checkpoint]
    sampled = invoke("run", out, *args, "--temperature", 0.5)
    assert sampled.exit_code == 2 and "fuse_decode {gumbel: true}" in sampled.stderr


def test_validate_reports_every_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - no_such_pass: {}\n  - fold_constants: {bogus: 1}\nlower: {backend: warp}\n")
    result = invoke("validate", "recipes/cpu-eager.yaml", bad)
    assert result.exit_code == 2
    assert "cpu-eager.yaml: ok" in result.stdout
    assert len([line for line in result.stderr.splitlines() if str(bad) in line]) >= 3


def test_validate_refuses_layer_skip_after_a_cache_pass(tmp_path):
    recipe = tmp_path / "late-skip.yaml"
    recipe.write_text("passes:\n  - causal_cache: {}\n  - layer_skip: {layers: [1]}\n")
    result = invoke("validate", recipe)
    assert result.exit_code == 2
    message = "passes: layer_skip must come before causal_cache (a pass with a K/V cache)"
    assert result.stderr.strip() == f"{recipe}: {message}"


UNUSABLE_DEVICES = ["foo", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", UNUSABLE_DEVICES)
@pytest.mark.parametrize("command", ["run", "eval", "compile"])
def test_an_unusable_device_is_one_line(checkpoints, tmp_path, command, device):
    out = tmp_path / "out"
    args = {
        "run": ["run", checkpoints["llada"], "--prompt-ids", "5,6", "--gen-length", 4],
        "eval": ["eval", "--per-task", 1],
        "compile": ["compile", checkpoints["llada"], "-o", out],
    }[command]
    result = invoke(*args, "--device", device)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: device: '{device}'") and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_run_strategy_and_its_options(checkpoints):
    args = ["run", checkpoints["llada"], "--prompt-ids", "5,6,7", "--gen-length", 8, "--block-length", 4, "--json"]
    eb = invoke(*args, "--strategy", "eb", "--strategy-config", '{"gamma": 10.4}')
    assert eb.exit_code == 0, eb.output
    assert json.loads(eb.stdout)["nfe"] < 8  # several tokens a step
    for extra, message in [
        (["--strategy", "eb", "--strategy-config", '{"gama": 1}'],
         "strategy.gama: not an option of eb (its options: gamma)"),
        (["--strategy", "nope"], "strategy: unknown strategy 'nope'"),
        (["--strategy-config", "{}"], "--strategy-config needs a --strategy"),
        (["--strategy", "eb", "--strategy-config", "[1"], "--strategy-config is not JSON"),
        (["--strategy", "eb", "--decoder", "dream"],
         "--strategy: decoding strategies run with the llada decoder, not dream"),
    ]:
        result = invoke(*args, *extra)
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
