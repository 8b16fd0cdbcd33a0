"""`dlmc calibrate`: the per-layer table a layer_skip budget is resolved from, from the command line."""

import json

from typer.testing import CliRunner

from dlmc.cli import app
from dlmc.generation import default_model_dir
from dlmc.passes.layer_skip import LayerSkip
from dlmc.passes.skip_calibration import calibrate, calibration_batches, choose_layers
from dlmc.capture import CaptureConfig, capture
from dlmc.models import load_model
from dlmc.tokenizer import load_tokenizer

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_table_and_chosen_layers_of_the_embedded_model():
    result = invoke("calibrate", "--budget", 2, "--examples", 8)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["layer", "cos(in,", "out)"]
    assert [line.split()[0] for line in lines[1:5]] == ["0", "1", "2", "3"]
    assert "8 canvases" in lines[5] and "budget 2 drops layers" in lines[5]


def test_logits_criterion_adds_its_column():
    result = invoke("calibrate", "--criterion", "logits", "--examples", 4, "--gen-length", 16)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "arg-max kept without it" in lines[0]
    assert len(lines[2].split()) == 3 and len(lines[1].split()) == 2 + len("(first layer: kept unless listed)".split())


def test_json_matches_the_library_on_the_same_canvases(checkpoints):
    result = invoke("calibrate", checkpoints["dream"], "--budget", 1, "--examples", 4, "--gen-length", 8, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    model = load_model(checkpoints["dream"])
    config = LayerSkip(budget=1, examples=4, gen_length=8)
    batches = calibration_batches(model.spec, load_tokenizer(checkpoints["dream"]), config, model=model)  # self
    expected = calibrate(capture(model, CaptureConfig()), batches)
    assert report["similarity"] == expected.to_dict()["similarity"]
    assert report["layers"] == list(choose_layers(expected.similarity, 1)) == [1]  # 2 layers: never the first


def test_bad_options_are_one_line():
    for args, message in [
        (("--budget", 4), "error: layer_skip.budget: must be between 1 and 3 (the step has 4 layers"),
        (("--budget", 0), "error: --budget: must be >= 1, got 0"),
        (("--gen-length", 0), "error: --gen-length: must be >= 1, got 0"),
        (("--criterion", "cosine"), "error: --criterion: 'cosine' is not one of similarity, logits"),
        (("--source", "web"), "error: --source: 'web' is not one of tasks, file, self, random"),
        ((default_model_dir() / "nope",), "nope"),
    ]:
        result = invoke("calibrate", *args)
        assert result.exit_code == 2
        assert result.output.startswith(message) or message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
