"""The host's schedule moves as the loop's device counters do: step by step through a decode whose rows
join mid-decode and end blocks at different steps, under LLaDA's schedule and under a rule whose
blocks end when full (the host then learns the ends from the step's one read)."""

import pytest

from dlmc.decoding.llada import LLaDAConfig
from dlmc.runtime.loop import Decoding
from dlmc.runtime.schedule import Schedule
from tests.runtime.test_loop import JOINING, PROMPTS, compile_fused


def test_a_row_moves_through_its_blocks_and_the_batch_keeps_its_rows():
    short = LLaDAConfig(gen_length=4, block_length=2, steps=4)
    long = LLaDAConfig(gen_length=8, block_length=2, steps=8)
    schedule = Schedule.of([short]) + Schedule.of([long])
    assert (schedule.steps_per_block, schedule.lo(12, 2)) == ([2, 2], [8, 4])
    assert schedule.ends() == [False, False] and schedule.advance([False, False]) == [False, False]
    assert schedule.ends() == [True, True] and schedule.advance([True, True]) == [False, False]
    assert (schedule.block, schedule.step, schedule.nfe, schedule.lo(12, 2)) == ([1, 1], [0, 0], [2, 2], [10, 6])
    schedule.advance([False, False]), schedule.advance([True, True])
    assert schedule.block == [2, 2] and schedule.keep([False, True]).gen == [8]


@pytest.mark.parametrize("name", ["schedule", "threshold"])
def test_the_host_schedule_is_the_device_counters(checkpoints, tmp_path, name):
    engine = compile_fused(checkpoints["llada"], tmp_path / "fused", "eager", cache=True)
    (long, short), decoding = JOINING[name], Decoding(engine)
    decoding.add(PROMPTS[0], long, seed=1)
    decoding.step(), decoding.step()
    decoding.add(PROMPTS[1] + list(range(20, 28)), short, seed=2)
    seen = set()
    while len(decoding):
        decoding.step()
        host = decoding.schedule
        assert host.block == decoding.block.tolist() and host.step == decoding.steps_in_block.tolist()
        assert host.nfe == decoding.row_nfe.tolist() and host.gen == decoding.rows.gen.tolist()
        seen.add(tuple(host.step))
    assert any(len(set(steps)) > 1 for steps in seen)  # the rows were at different steps of their blocks
