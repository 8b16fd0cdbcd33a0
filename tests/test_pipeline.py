from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch

from dlmc.capture import CaptureConfig, capture
from dlmc.models import load_model
from dlmc.passes import PASSES, PassConfig, PassResult, copy_graph, rebuild
from dlmc.passes.fold_constants import FoldConstants
from dlmc.passes.mixed_precision import MixedPrecision
from dlmc.pipeline import PassError, run_passes
from tests.helpers import padded_batch


@dataclass(frozen=True, kw_only=True)
class Explode(PassConfig):
    name: ClassVar[str] = "explode"
    exact: ClassVar[bool] = True


@dataclass(frozen=True, kw_only=True)
class BreakGraph(PassConfig):
    """Rewires the output to a node that is not the logits: the graph still runs, but no longer
    matches the recorded signature (bool, not float32)."""

    name: ClassVar[str] = "break_graph"
    exact: ClassVar[bool] = True


def explode(program, config):
    raise RuntimeError("boom\nsecond line")


def break_graph(program, config):
    gm = copy_graph(program)
    mask = next(n for n in gm.graph.nodes if n.name == "attention_mask")
    gm.graph.output_node().args = ((mask,),)
    return PassResult(rebuild(program, gm), True)


@pytest.fixture(scope="module")
def step(checkpoints):
    return capture(load_model(checkpoints["dream"]), CaptureConfig(max_batch=4))


@pytest.fixture
def test_passes(monkeypatch):
    monkeypatch.setitem(PASSES, Explode, explode)
    monkeypatch.setitem(PASSES, BreakGraph, break_graph)


def test_runs_in_recipe_order_and_reports_each_pass(step):
    seen = []
    out = run_passes(step, [MixedPrecision(), FoldConstants()], on_pass=lambda p: seen.append(p.name))
    assert seen == ["mixed_precision", "fold_constants"]
    assert out.exported.state_dict["lm_head.weight"].dtype == torch.bfloat16
    inputs = padded_batch([4, 8], 8)
    assert torch.equal(out(*inputs), run_passes(step, [MixedPrecision()])(*inputs))


def test_empty_pipeline_returns_the_program(step):
    assert run_passes(step, []) is step


def test_a_raising_pass_is_named_with_the_passes_before_it(step, test_passes):
    with pytest.raises(PassError) as info:
        run_passes(step, [FoldConstants(), MixedPrecision(), Explode()])
    message = str(info.value)
    assert message.startswith("pass 'explode' failed (after ['fold_constants', 'mixed_precision'])")
    assert "RuntimeError: boom" in message and "\n" not in message


def test_an_invalid_graph_is_caught_before_the_next_pass(step, test_passes):
    ran = []
    with pytest.raises(PassError, match="pass 'break_graph' left an invalid graph \\(after no passes\\)") as info:
        run_passes(step, [BreakGraph(), FoldConstants()], on_pass=lambda p: ran.append(p.name))
    assert "logits is bool in the graph but float32" in str(info.value)
    assert ran == ["break_graph"]


def test_a_recorded_signature_change_is_accepted(step, test_passes, monkeypatch):
    def break_and_record(program, config):
        broken = break_graph(program, config).program
        outputs = (replace(program.signature.outputs[0], dtype="bool"),)
        return PassResult(broken.with_exported(broken.exported, replace(program.signature, outputs=outputs)), True)

    monkeypatch.setitem(PASSES, BreakGraph, break_and_record)
    out = run_passes(step, [BreakGraph()])
    assert out.signature.outputs[0].dtype == "bool"
