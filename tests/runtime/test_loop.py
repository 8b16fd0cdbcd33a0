"""The fused loop (fuse_decode artifacts) gives the reference decoder's tokens: LLaDA and Dream through
the llada decoder, every commit rule, batch 1 and a batch of different lengths, temperature 0 and > 0,
on eager, AOTInductor and ONNX Runtime; with a dual cache it gives what the unfused artifact gives.
Under LLaDA's schedule its steps read nothing back from the device; other rules read once a step."""

import contextlib
import dataclasses

import pytest
import torch

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.decoding.common import fill_undecided
from dlmc.decoding.llada import LLaDAConfig, generate
from dlmc.errors import DlmcError
from dlmc.models import load_model
from dlmc.recipe import parse_recipe
from dlmc.runtime.loop import Decoding
from tests.helpers import MarginRecorder

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
CONFIGS = {
    "schedule": LLaDAConfig(gen_length=8, block_length=4, steps=8),
    "threshold": LLaDAConfig(gen_length=8, block_length=4, threshold=0.5),
    "factor": LLaDAConfig(gen_length=8, block_length=4, factor=1.0),
    "sampled": LLaDAConfig(gen_length=8, block_length=4, steps=4, temperature=0.7),
    "random": LLaDAConfig(gen_length=8, block_length=4, steps=4, remasking="random"),
}


def compile_fused(checkpoint, out, backend, cache=False, fuse=True):
    passes = [{"fold_constants": {}}]
    passes += [{"block_cache": {"mode": "dual", "block_length": 4}}] if cache else []
    passes += [{"fuse_decode": {"gumbel": True}}] if fuse else []
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": passes, "lower": {"backend": backend}})
    compile_model(checkpoint, recipe, out, force=True)
    return dlmc.runtime.load(out)


@pytest.mark.parametrize(
    "family,backend", [("llada", "eager"), ("dream", "eager"), ("llada", "inductor"), ("dream", "onnxrt")]
)
def test_reference_tokens(checkpoints, tmp_path, family, backend):
    engine = compile_fused(checkpoints[family], tmp_path / "fused", backend)
    model = load_model(checkpoints[family])
    for name, config in CONFIGS.items():
        for prompts in (PROMPTS[:1], PROMPTS):
            recorder = MarginRecorder(model, config.gen_length, config.block_length)
            expected = generate(recorder, model.spec, prompts, config, seed=3)
            if config.temperature == 0 and config.remasking != "random":
                recorder.assert_clear(reduction=96)  # every decision clears the rounding tolerance
            actual = engine.generate(prompts, config=config, seed=3)  # the manifest's decoder: llada
            assert (actual.output_ids, actual.nfe) == (expected.output_ids, expected.nfe), (name, len(prompts))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_dual_cache_fusion_changes_nothing(checkpoints, tmp_path, family):
    fused = compile_fused(checkpoints[family], tmp_path / "fused", "eager", cache=True)
    unfused = compile_fused(checkpoints[family], tmp_path / "unfused", "eager", cache=True, fuse=False)
    for name, config in CONFIGS.items():
        for prompts in (PROMPTS[:1], PROMPTS):
            actual = fused.generate(prompts, "llada", config, seed=3)
            expected = unfused.generate(prompts, "llada", config, seed=3)
            assert (actual.output_ids, actual.nfe) == (expected.output_ids, expected.nfe), (name, len(prompts))


def test_the_block_length_is_chosen_at_run_time(checkpoints, tmp_path):
    """A dual-cache artifact built for block 4 decodes at block 2 and 8 exactly as one built for them:
    the fused step's dims are dynamic and the loop decides what is cached."""
    built_for_4 = compile_fused(checkpoints["llada"], tmp_path / "four", "eager", cache=True)
    recipe = parse_recipe({"capture": {"max_batch": 4}, "lower": {"backend": "eager"}, "passes": [
        {"fold_constants": {}}, {"block_cache": {"mode": "dual", "block_length": 2}}, {"fuse_decode": {"gumbel": True}}]})
    built_for_2 = dlmc.runtime.load(compile_model(checkpoints["llada"], recipe, tmp_path / "two"))
    for config in (LLaDAConfig(gen_length=8, block_length=2, steps=8), LLaDAConfig(gen_length=8, threshold=0.5)):
        assert built_for_4.generate(PROMPTS, config=config).output_ids == built_for_2.generate(PROMPTS, config=config).output_ids


def test_settings_it_cannot_run_are_one_line(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=True)
    with pytest.raises(DlmcError, match="cfg_scale: not compiled into"):
        engine.generate([[5, 6]], config=LLaDAConfig(gen_length=8, block_length=4, cfg_scale=1.0))
    with pytest.raises(DlmcError, match="fuses the llada decoder's rule, not dream's"):
        engine.generate([[5, 6]], "dream")
    with pytest.raises(DlmcError, match="returns decoded tokens"):
        engine.step(torch.tensor([[5, 6]]))
    greedy = compile_fused(checkpoints["llada"], tmp_path / "greedy", "eager")
    plain_recipe = parse_recipe({"passes": [{"fuse_decode": {}}], "lower": {"backend": "eager"}})
    compile_model(checkpoints["llada"], plain_recipe, tmp_path / "greedy", force=True)
    greedy = dlmc.runtime.load(tmp_path / "greedy")
    with pytest.raises(DlmcError, match=r"temperature=0.5: .* compile it with fuse_decode \{gumbel: true\}"):
        greedy.generate([[5, 6]], config=LLaDAConfig(gen_length=4, temperature=0.5))


def test_on_canvas_shows_every_step_and_changes_nothing(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=True)
    config = CONFIGS["threshold"]
    canvases = []
    actual = engine.generate(PROMPTS, config=config, seed=3, on_canvas=lambda g: canvases.append(g.tolist()))
    assert actual == engine.generate(PROMPTS, config=config, seed=3)
    assert len(canvases) == actual.nfe and canvases[-1] == actual.output_ids


@pytest.mark.parametrize("cache", [False, True])
def test_stop_at_eos_gives_the_reference_tokens(checkpoints, tmp_path, cache):
    """Rows that stop at EOS leave the fused batch as they leave the reference's, after the same block.
    With the (approximate) dual cache the reference is the decoder on the unfused cached step."""
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=cache)
    model = load_model(checkpoints["llada"])
    reference = model
    if cache:
        reference = compile_fused(checkpoints["llada"], tmp_path / "unfused", "eager", cache=True, fuse=False)
    for name, config in CONFIGS.items():
        full = reference_generate(reference, model.spec, config)
        # a random fixture says no EOS: make the first token row 0 says its stop token, so row 0 stops
        # after block 0 and row 1 wherever that token settles (if ever)
        spec = dataclasses.replace(model.spec, eos_token_id=full.output_ids[0][0], eot_token_id=None)
        engine.spec = spec  # what the loop reads
        stopping = dataclasses.replace(config, stop_at_eos=True)
        expected = reference_generate(reference, spec, stopping)
        actual = engine.generate(PROMPTS, config=stopping, seed=3)
        assert (actual.output_ids, actual.nfe, actual.row_nfe) == (expected.output_ids, expected.nfe, expected.row_nfe)
        assert expected.row_nfe[0] < full.row_nfe[0], name
        assert expected.output_ids[0][: config.block_length] == full.output_ids[0][: config.block_length], name


def reference_generate(reference, spec, config):
    """The llada decoder on the eager model (its decisions checked for margins at temperature 0), or on
    an unfused artifact's step."""
    if hasattr(reference, "decode"):
        reference.spec = spec
        return reference.generate(PROMPTS, "llada", config, seed=3)
    recorder = MarginRecorder(reference, config.gen_length, config.block_length)
    out = generate(recorder, spec, PROMPTS, config, seed=3)
    if config.temperature == 0 and config.remasking != "random":
        recorder.assert_clear(reduction=96)
    return out


JOINING = {
    "schedule": (LLaDAConfig(gen_length=12, block_length=4, steps=12),
                 LLaDAConfig(gen_length=4, block_length=4, steps=2)),
    "threshold": (LLaDAConfig(gen_length=12, block_length=4, threshold=0.9),
                  LLaDAConfig(gen_length=4, block_length=4, threshold=0.9, stop_at_eos=True)),
    "sampled": (LLaDAConfig(gen_length=12, block_length=4, steps=12, temperature=0.7),
                LLaDAConfig(gen_length=8, block_length=4, steps=4, temperature=0.7)),
}


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("name", list(JOINING))
def test_a_row_joins_a_running_batch_and_leaves_first(checkpoints, tmp_path, cache, name):
    """A row added after two steps of another joins at the next step (its canvas, with a longer prompt,
    re-pads the running row's), finishes first and leaves while the other continues; each gets the
    tokens and evaluations of its solo run, which are the reference decoder's."""
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=cache)
    model = load_model(checkpoints["llada"])
    (long, short), first = JOINING[name], PROMPTS[0]
    second = PROMPTS[1] + list(range(20, 28))  # 13 + 4 (or 8) columns: wider than the running 3 + 12
    decoding = Decoding(engine)
    a = decoding.add(first, long, seed=1)
    decoding.step(), decoding.step()
    assert decoding.accepts(short)
    assert not decoding.accepts(dataclasses.replace(short, block_length=2, steps=short.gen_length))
    b = decoding.add(second, short, seed=2)
    left, widths = {}, []
    while len(decoding):
        for row in decoding.step():
            left[row.handle] = (decoding.nfe, row)
        widths.append(decoding.rows.width)
    assert left[b][0] < left[a][0]  # b left at an earlier step, a went on alone
    both, alone = len(second) + short.gen_length, len(first) + long.gen_length  # 17 > 15: a was re-padded
    assert widths == [both] * (left[b][0] - 3) + [alone] * (left[a][0] - left[b][0]) + [0]  # after each step
    assert left[b][1].nfe == left[b][0] - 2  # b took part from the step after it was added
    for (prompt, config, seed), handle in (((first, long, 1), a), ((second, short, 2), b)):
        solo = engine.generate([prompt], config=config, seed=seed)
        if not cache:  # the reference's decisions clear rounding, so a batch cannot flip them
            recorder = MarginRecorder(model, config.gen_length, config.block_length)
            reference = generate(recorder, model.spec, [prompt], config, seed=seed)
            if config.temperature == 0:
                recorder.assert_clear(reduction=96)
            assert (reference.output_ids, reference.row_nfe) == (solo.output_ids, solo.row_nfe)
        row = left[handle][1]
        assert (fill_undecided(row.generated, model.spec), row.nfe) == (solo.output_ids[0], solo.row_nfe[0]), name


def test_a_dropped_row_leaves_and_the_others_continue(checkpoints, tmp_path):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=True)
    config = CONFIGS["schedule"]
    decoding = Decoding(engine)
    kept, dropped, never = (decoding.add(p, config, seed=3) for p in (*PROMPTS, [9, 9]))
    decoding.drop(never)  # before it ran
    decoding.step()
    assert decoding.handles == [kept, dropped]
    decoding.drop(dropped)
    assert decoding.handles == [kept] and decoding.rows.width == len(PROMPTS[0]) + config.gen_length
    rows = [row for _ in range(config.steps) for row in decoding.step()]
    assert [row.handle for row in rows] == [kept] and not len(decoding)
    solo = engine.generate(PROMPTS[:1], config=config, seed=3)
    assert fill_undecided(rows[0].generated, engine.spec) == solo.output_ids[0]
    with pytest.raises(DlmcError, match="a row joining this batch must share them"):
        decoding.add([5], config), decoding.add([5], dataclasses.replace(config, block_length=2, steps=8))


class SyncCounter:
    """Counts the host's reads of tensor values (on CUDA each waits for the queued kernels) inside every
    `Decoding.step` call, one count per step. The compiled step runs inside too: the eager engine's
    model code branches on shapes, not values, so what is counted is the loop's."""

    READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero")
    INDEXING = ("__getitem__", "__setitem__")  # by a bool mask: how many it selects is read back

    def __init__(self, monkeypatch):
        self.per_step: list[int] = []
        step = Decoding.step

        def counted(decoding):
            self.per_step.append(0)
            with self._counting():
                return step(decoding)

        monkeypatch.setattr(Decoding, "step", counted)

    @contextlib.contextmanager
    def _counting(self):
        saved = {name: getattr(torch.Tensor, name) for name in (*self.READS, *self.INDEXING)}

        def read(original):
            def counted(tensor, *args, **kwargs):
                self.per_step[-1] += 1
                return original(tensor, *args, **kwargs)
            return counted

        def indexed(original):
            def counted(tensor, index, *args):
                parts = index if isinstance(index, tuple) else (index,)
                self.per_step[-1] += any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
                return original(tensor, index, *args)
            return counted

        try:
            for name, original in saved.items():
                setattr(torch.Tensor, name, indexed(original) if name in self.INDEXING else read(original))
            yield
        finally:
            for name, original in saved.items():
                setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "dual"])
def test_the_schedule_steps_without_host_syncs(checkpoints, tmp_path, monkeypatch, cache):
    """LLaDA's schedule (confidence or random remasking, temperature 0 or > 0): no step reads a device
    value, uncached or under the dual cache, rows joining mid-decode included; the tokens and NFE stay
    the reference's (uncached: the reference decoder; dual: the unfused artifact through it)."""
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=cache)
    model = load_model(checkpoints["llada"])
    reference = compile_fused(checkpoints["llada"], tmp_path / "unfused", "eager", cache=True, fuse=False)
    counter = SyncCounter(monkeypatch)
    for name in ("schedule", "sampled", "random"):
        config = CONFIGS[name]
        expected = reference.generate(PROMPTS, "llada", config, seed=3) if cache else None
        if not cache:
            recorder = MarginRecorder(model, config.gen_length, config.block_length)
            expected = generate(recorder, model.spec, PROMPTS, config, seed=3)
            if config.temperature == 0 and config.remasking != "random":
                recorder.assert_clear(reduction=96)
        counter.per_step.clear()
        actual = engine.generate(PROMPTS, config=config, seed=3)
        assert (actual.output_ids, actual.nfe, actual.row_nfe) == (expected.output_ids, expected.nfe, expected.row_nfe)
        assert counter.per_step == [0] * actual.nfe, name
    (long, short), decoding = JOINING["schedule"], Decoding(engine)  # block ends at different steps
    counter.per_step.clear()
    decoding.add(PROMPTS[0], long, seed=1)
    decoding.step(), decoding.step()
    decoding.add(PROMPTS[1] + list(range(20, 28)), short, seed=2)  # wider: re-pads the running row
    while len(decoding):
        decoding.step()
    assert counter.per_step == [0] * decoding.nfe


@pytest.mark.parametrize("cache", [False, True], ids=["uncached", "dual"])
def test_host_syncs_left(checkpoints, tmp_path, monkeypatch, cache):
    """What still reads the device: a rule whose blocks end when full, once a step; stop_at_eos under
    the schedule, once at each block's end (rows 0 and 1 end blocks together: every 4th step)."""
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=cache)
    counter = SyncCounter(monkeypatch)
    actual = engine.generate(PROMPTS, config=CONFIGS["threshold"], seed=3)
    assert counter.per_step == [1] * actual.nfe
    full = engine.generate(PROMPTS, config=CONFIGS["schedule"], seed=3)
    engine.spec = dataclasses.replace(engine.spec, eos_token_id=full.output_ids[1][-1], eot_token_id=None)
    counter.per_step.clear()
    stopping = engine.generate(PROMPTS, config=dataclasses.replace(CONFIGS["schedule"], stop_at_eos=True), seed=3)
    steps_per_block = CONFIGS["schedule"].steps_per_block
    assert counter.per_step == [int(step % steps_per_block == 0) for step in range(1, stopping.nfe + 1)]
