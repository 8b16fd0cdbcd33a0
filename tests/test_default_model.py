"""The embedded default model: a LLaDA-format checkpoint inside the package that really solves its tasks."""

from dlmc import tasks
from dlmc.evaluate import evaluate
from dlmc.generation import decoder_config, default_model_dir
from dlmc.models import describe, load_model
from dlmc.tokenizer import load_tokenizer


def test_ships_in_llada_format_under_25_mb():
    path = default_model_dir()
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 25 * 2**20
    info = describe(path)
    assert info["family"] == "llada" and info["max_length"] >= 128 + 16


def test_solves_held_out_prompts_at_one_token_per_step():
    path = default_model_dir()
    model, tokenizer = load_model(path), load_tokenizer(path)
    name, config = decoder_config(model.spec, None, {"gen_length": 128, "steps": 128, "block_length": 32})
    report = evaluate(model, model.spec, tokenizer, name, config, per_task=2, batch_size=8)
    assert report.nfe == 128
    assert report.accuracy >= 0.75, report.to_dict()
    assert set(report.per_task) == set(tasks.TASKS)
