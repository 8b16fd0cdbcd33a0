"""The lm-evaluation-harness adapter on a local task file (no downloads): lm-eval drives dlmc's
decoders and scores the strings it returns."""

import json
import os

import pytest

# the task reads a local jsonl: nothing may reach the network (a CI machine has none)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval is not installed (the eval extra: pip install -e '.[eval]')")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dlmc import tasks  # noqa: E402
from dlmc.errors import DlmcError  # noqa: E402
from dlmc.generation import default_model_dir, generate  # noqa: E402
from dlmc.integrations.lm_eval import DlmcLM, cut_at, main, with_strategy  # noqa: E402
from dlmc.models import load_model  # noqa: E402
from dlmc.decoding.llada import LLaDAConfig  # noqa: E402
from dlmc.tokenizer import load_tokenizer  # noqa: E402

EXAMPLES = [e for e in tasks.held_out(2) if e.task != "count"][:4]  # answers of at most 10 characters
TASK = """
task: dlmc_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def request(context: str, **gen_kwargs) -> Instance:
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def expected_texts(config: LLaDAConfig) -> list[str]:
    """What dlmc itself generates for the examples, cut at EOS."""
    model = load_model(default_model_dir())
    tokenizer = load_tokenizer(default_model_dir())
    out = generate(model, model.spec, tokenizer, [tokenizer.encode(e.prompt) for e in EXAMPLES], "llada", config)
    return [c.text for c in out]


@pytest.fixture
def toy_task(tmp_path):
    """A directory holding the task `dlmc_toy` over a local jsonl of EXAMPLES."""
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n" for e in EXAMPLES))
    (tmp_path / "toy.yaml").write_text(TASK.format(data=data))
    return tmp_path


def test_lm_eval_scores_the_strings_the_adapter_returns(toy_task):
    tmp_path = toy_task
    results = lm_eval.simple_evaluate(
        model="dlmc", model_args="block_length=8", tasks=["dlmc_toy"], batch_size=4, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    texts = expected_texts(LLaDAConfig(gen_length=16, block_length=8))
    samples = results["samples"]["dlmc_toy"]
    assert [s["resps"][0][0] for s in sorted(samples, key=lambda s: s["doc_id"])] == [cut_at(t, ["\n"]) for t in texts]
    accuracy = sum(tasks.is_correct(e, t) for e, t in zip(EXAMPLES, texts)) / len(EXAMPLES)
    assert results["results"]["dlmc_toy"]["exact_match,none"] == pytest.approx(accuracy)
    assert accuracy > 0  # the embedded model solves some: the comparison says something


def test_until_and_max_gen_toks_cut_the_text():
    lm = DlmcLM(gen_length=16, block_length=8, batch_size=2)
    full = expected_texts(LLaDAConfig(gen_length=16, block_length=8))
    stop = full[0][1]  # the answer's second character stops it
    answers = lm.generate_until([request(EXAMPLES[0].prompt, until=[stop], max_gen_toks=16),
                                 request(EXAMPLES[1].prompt, until=[], max_gen_toks=2)])
    assert answers[0] == full[0][: full[0].index(stop)] and len(answers[0]) < len(full[0])
    assert answers[1] == full[1][:2]  # the embedded tokenizer spells one character per token


def test_a_strategy_travels_as_the_decoder_configs_strategy_field():
    # the one coupling point with the strategy layer: strategy=NAME, strategy.PARAM=VALUE -> config.strategy
    options = with_strategy({"gen_length": 8, "strategy.gamma": 0.1}, "eb")
    assert options == {"gen_length": 8, "strategy": {"name": "eb", "gamma": 0.1}}
    assert with_strategy({}, "threshold") == {"strategy": "threshold"}
    with pytest.raises(DlmcError, match="strategy") as e:  # the decoder config judges it: one line
        DlmcLM(strategy="no-such-strategy")
    assert "\n" not in str(e.value)


def test_loglikelihood_is_refused_with_one_line():
    lm = DlmcLM(gen_length=8)
    for method in (lm.loglikelihood, lm.loglikelihood_rolling):
        with pytest.raises(DlmcError, match="no cheap exact likelihood"):
            method([])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(dict(thresold=0.9), "--thresold does not apply"), (dict(batch_size="auto"), "batch_size=auto"),
     (dict(artifact="a", checkpoint="b"), "exclusive"), ({"strategy.gamma": 0.1}, "without strategy=NAME")],
)
def test_bad_model_args_name_the_setting(args, fragment):
    with pytest.raises(DlmcError, match=fragment):
        DlmcLM(**args)


def test_unsupported_gen_kwargs_are_refused_not_ignored():
    lm = DlmcLM(gen_length=8)
    with pytest.raises(DlmcError, match="top_p is not supported"):
        lm.generate_until([request("add 12+34:", until=[], top_p=0.9)])


def test_the_command_line_runs_the_task_and_prints_dlmc_errors_as_one_line(toy_task, capsys):
    # lm-eval's command line asks for cuda:0 unless told otherwise
    common = ["--tasks", "dlmc_toy", "--include_path", str(toy_task), "--batch_size", "4", "--device", "cpu"]
    main(["--model", "dlmc", "--model_args", "block_length=8,decoder=freedave,drafts=3", *common])
    assert "dlmc_toy" in capsys.readouterr().out  # lm-eval's results table
    with pytest.raises(SystemExit) as exit_:
        main(["--model", "dlmc", "--model_args", "thresold=0.9", *common])
    assert exit_.value.code == 2
    assert "error: model_args: --thresold does not apply" in capsys.readouterr().err
