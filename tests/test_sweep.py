import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dlmc.cli import app
from dlmc.errors import DlmcError
from dlmc.generation import default_model_dir
from dlmc.models import load_model
from dlmc.sweep import entry_config, format_sweep, load_sweep, run_sweep

SHIPPED = Path(__file__).parents[1] / "benchmarks" / "strategies.yaml"
TWO = """
per_task: 1
batch_size: 4
decode: {gen_length: 16, block_length: 8}
entries:
  - name: one-per-step
    decoder: llada
  - name: freedave
    decoder: freedave
    options: {drafts: 3}
"""


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_sweep_prints_every_entry_and_writes_the_pareto_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    plot = tmp_path / "pareto.png"
    result = invoke("bench", "--sweep", write(tmp_path, TWO), "--plot", plot, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert [r["name"] for r in rows] == ["one-per-step", "freedave"]
    # freedave is lossless: the baseline's tokens, so its accuracy, with fewer model calls
    assert rows[0]["agreement"] == rows[1]["agreement"] == 1.0
    assert rows[1]["accuracy"] == rows[0]["accuracy"]
    assert rows[1]["nfe"] < rows[0]["nfe"] == 16
    assert rows[0]["decoder"] == "llada" and rows[0]["config"]["steps"] == 16 and rows[0]["nfe_per_prompt"] == 16
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threshold_entry_disagrees_and_saves_calls(tmp_path):
    sweep = load_sweep(write(tmp_path, TWO.replace("decoder: freedave\n    options: {drafts: 3}",
                                                   "options: {threshold: 0.5}")))
    rows = run_sweep(sweep)
    assert rows[1].nfe < rows[0].nfe
    assert 0 < rows[1].agreement <= 1 and rows[1].config["threshold"] == 0.5
    # one batch of 4 prompts: one per step costs every prompt 16 calls; a threshold row that is done
    # leaves the batch, so the prompts' mean is at most the batch's count
    assert rows[0].nfe_per_prompt == 16
    assert 1 <= rows[1].nfe_per_prompt <= rows[1].nfe
    table = format_sweep(rows)
    assert "one-per-step" in table and "freedave" in table and "NFE ratio" in table and "NFE/prompt" in table


def test_every_shipped_entry_builds_a_config():
    sweep = load_sweep(SHIPPED)
    spec = load_model(default_model_dir()).spec
    names = [entry_config(spec, entry, {}, sweep.decode)[0] for entry in sweep.entries]
    assert names[0] == "llada" and "freedave" in names
    assert len(sweep.entries) >= 8


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ("  - name: a\n  - name: b\n    options: {threshold: 1.5}\n", "entries[1] (b): threshold=1.5"),
        ("  - name: a\n  - name: b\n    options: {thresold: 0.9}\n", "entries[1] (b): --thresold"),
        ("  - name: a\n  - name: b\n    colour: red\n", "entries[1] (b): unknown key 'colour'"),
        ("  - name: a\n  - name: a\n", "entries[1].name: 'a' is used twice"),
        ("  - name: a\n  - options: {}\n", "entries[1].name"),
        ("  - name: a\n  - name: b\n    decoder: nope\n", "entries[1] (b): unknown decoder 'nope'"),
        ("  - name: a\n  - name: b\n    artifact: missing/\n", "entries[1] (b).artifact: 'missing/' does not exist"),
        ("  - name: a\n  - name: b\n    strategy: {name: nope}\n", "entries[1] (b)"),
        ("  - name: a\n  - name: b\n    options: [1]\n", "entries[1] (b).options"),
    ],
)
def test_a_bad_sweep_file_gets_one_line_naming_the_entry_and_field(tmp_path, entries, fragment):
    path = write(tmp_path, "per_task: 1\nentries:\n" + entries)
    result = invoke("bench", "--sweep", path)
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert "\n" not in message and fragment in message, message
    if "strategy" in entries:
        assert "strategy" in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("entries: []\n", "entries: a non-empty list"), ("per_task: 0\nentries: [{name: a}]\n", "per_task"),
     ("[1, 2]\n", "a sweep file is a mapping"), ("entries: [{name: a}]\nextra: 1\n", "unknown key 'extra'")],
)
def test_a_bad_sweep_file_structure(tmp_path, text, fragment):
    with pytest.raises(DlmcError, match=fragment):
        load_sweep(write(tmp_path, text))


def test_plot_needs_a_sweep_and_a_sweep_takes_no_artifact(tmp_path):
    assert "--plot needs --sweep" in invoke("bench", "--plot", tmp_path / "p.png").stderr
    assert "with --sweep" in invoke("bench", tmp_path, "--sweep", write(tmp_path, TWO)).stderr
    assert "bench needs an artifact" in invoke("bench").stderr


def test_a_recipe_entry_is_compiled_and_an_artifact_entry_loaded(tmp_path):
    recipes = Path(__file__).parents[1] / "recipes"
    text = TWO.replace("decoder: freedave\n    options: {drafts: 3}", f"recipe: {recipes / 'cpu-eager.yaml'}")
    rows = run_sweep(load_sweep(write(tmp_path, text)), workdir=tmp_path / "work")
    assert (tmp_path / "work" / "freedave" / "manifest.json").is_file()
    # the same maths compiled: a fixed schedule, and tokens that match but where rounding decides a near tie
    assert rows[1].nfe == rows[0].nfe == 16 and rows[1].agreement > 0.9
    text = TWO.replace("decoder: freedave\n    options: {drafts: 3}", f"artifact: {tmp_path / 'work' / 'freedave'}")
    rows = run_sweep(load_sweep(write(tmp_path, text)))
    assert rows[1].agreement > 0.9 and rows[1].decoder == "llada"
