"""The worker: batches of equal decoder settings in arrival order, a bounded queue, cancellation,
draining on close, and a failing batch that does not stop the worker."""

import threading
import time
from concurrent.futures import CancelledError

import pytest

import dlmc.runtime
from dlmc.compiler import compile_model
from dlmc.generation import default_model_dir
from dlmc.recipe import parse_recipe
from dlmc.serve.model import DecodeKey, Output, ServedModel
from dlmc.serve.worker import Closed, Job, QueueFull, Worker

A, B = DecodeKey("llada", "config a", 0), DecodeKey("llada", "config b", 0)


class Stub:
    """Stands in for ServedModel: records batches; the first waits for `go`."""

    class spec:
        mask_token_id = 3

    stops = frozenset({0})
    steps_rows = False  # batches at generation boundaries

    def __init__(self, max_batch=8, fail=False):
        self.max_batch, self.fail = max_batch, fail
        self.batches: list[tuple[DecodeKey, list[list[int]]]] = []
        self.go, self.started = threading.Event(), threading.Event()

    def run(self, prompts, key, on_canvas=None):
        self.started.set()
        self.go.wait(10)
        self.batches.append((key, prompts))
        if self.fail and len(self.batches) == 1:
            raise RuntimeError("boom")
        return [Output(text=str(p), completion_tokens=1, finish_reason="length", nfe=1) for p in prompts]


def busy_worker(stub, max_queue=16):
    """A started worker decoding a first job that waits for stub.go."""
    worker = Worker(stub, max_queue)
    worker.start()
    first = Job([0], A)
    worker.submit([first])
    assert stub.started.wait(10)
    return worker, first


def test_equal_settings_batch_together_in_arrival_order():
    stub = Stub(max_batch=3)
    worker, _ = busy_worker(stub)
    jobs = [Job([i], key) for i, key in enumerate([A, B, A, A, B, A], start=1)]
    worker.submit(jobs)
    stub.go.set()
    assert [job.future.result(10).text for job in jobs] == [str([i]) for i in range(1, 7)]
    worker.close()
    assert [(key, [p[0] for p in prompts]) for key, prompts in stub.batches] == [
        (A, [0]), (A, [1, 3, 4]), (B, [2, 5]), (A, [6])  # at most max_batch=3 rows
    ]


def test_full_queue_refuses_and_cancelled_jobs_are_dropped():
    stub = Stub()
    worker, _ = busy_worker(stub, max_queue=2)
    waiting = [Job([1], A), Job([2], A)]
    worker.submit(waiting)
    with pytest.raises(QueueFull):
        worker.submit([Job([3], A)])
    assert waiting[0].future.cancel()  # a client went away while its job was queued
    worker.submit([Job([3], A)])  # its place is free again
    stub.go.set()
    worker.close()
    assert [[p[0] for p in prompts] for _, prompts in stub.batches] == [[0], [2, 3]]


def test_close_drains_the_queue_then_refuses():
    stub = Stub()
    worker, first = busy_worker(stub)
    queued = Job([1], B)
    worker.submit([queued])
    closer = threading.Thread(target=worker.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(Closed):
        worker.submit([Job([2], A)])
    stub.go.set()
    closer.join(10)
    assert first.future.result(0).text == "[0]" and queued.future.result(0).text == "[1]"


def test_a_failing_batch_fails_its_jobs_only():
    stub = Stub(fail=True)
    worker, first = busy_worker(stub)
    later = Job([1], B)
    worker.submit([later])
    stub.go.set()
    with pytest.raises(RuntimeError, match="boom"):
        first.future.result(10)
    assert later.future.result(10).text == "[1]"
    worker.close()


# ---------------------------------------------------------------------------------------------
# step-level batching: a fused LLaDA artifact
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "fused"
    recipe = parse_recipe({"capture": {"max_batch": 4}, "passes": [{"fold_constants": {}}, {"fuse_decode": {}}],
                           "lower": {"backend": "eager"}})
    compile_model(default_model_dir(), recipe, out)
    return dlmc.runtime.load(out)


class Steps:
    """A ServedModel over the engine whose Decoding logs the rows of every step; `hooks[n]` runs just
    before step n (1-based), from the worker thread."""

    def __init__(self, engine, hooks):
        self.served = ServedModel(engine, engine.spec, engine.tokenizer, {}, "fused")
        self.rows: list[int] = []
        make = self.served.decoding

        def decoding():
            d = make()
            step = d.step

            def logged():
                if len(self.rows) + 1 in hooks:
                    hooks[len(self.rows) + 1]()
                self.rows.append(len(d))
                return step()

            d.step = logged
            return d

        self.served.decoding = decoding

    def job(self, prompt: str, **options) -> Job:
        ids = self.served.tokenizer.encode(prompt)
        return Job(ids, self.served.decode_key(None, options, options.pop("seed", 0), [ids]))

    def solo(self, job: Job) -> Output:
        return self.served.run([job.prompt], job.key)[0]


def test_a_request_joins_the_running_batch_and_a_short_one_leaves_first(engine):
    entered, joined = threading.Event(), threading.Event()
    steps = Steps(engine, {3: lambda: (entered.set(), joined.wait(10))})  # step 3 waits for the next requests
    long = steps.job("count 417:", gen_length=32, block_length=8, stop_at_eos=False)  # 32 steps
    short = steps.job("shift abc:", gen_length=8, seed=5)  # its block length is its gen_length: 8
    waiting = steps.job("count 12:", gen_length=8, block_length=4)  # another block length: waits
    assert steps.served.steps_rows
    worker = Worker(steps.served, max_queue=8)
    worker.start()
    worker.submit([long])
    assert entered.wait(30)
    worker.submit([short, waiting])
    joined.set()
    outputs = [job.future.result(60) for job in (long, short, waiting)]
    worker.close()
    assert outputs == [steps.solo(job) for job in (long, short, waiting)]  # each its solo answer
    assert outputs[0].nfe == 32 and outputs[1].nfe <= 8
    # long ran alone for 3 steps, short joined at step 4, left after its own steps while long went on;
    # waiting ran only once the batch was empty
    assert steps.rows == [1, 1, 1] + [2] * outputs[1].nfe + [1] * (29 - outputs[1].nfe) + [1] * outputs[2].nfe
    assert worker.batch_sizes == {1: len(steps.rows) - outputs[1].nfe, 2: outputs[1].nfe}


def test_a_cancelled_row_leaves_and_streaming_sends_the_settled_prefix(engine):
    steps_hooks = {}
    steps = Steps(engine, steps_hooks)
    first, second = steps.job("count 417:", gen_length=16), steps.job("shift abc:", gen_length=16)
    steps_hooks[6] = second.cancel  # its client goes away after 5 steps
    sent: list[list[int]] = []
    first.on_settled = sent.append
    worker = Worker(steps.served, max_queue=8)
    worker.start()
    worker.submit([first, second])
    answer = first.future.result(60)
    worker.close()
    with pytest.raises(CancelledError):
        second.future.result(0)
    assert steps.rows == [2] * 6 + [1] * 10  # dropped before step 7
    assert answer == steps.solo(first)
    assert sent and all(a == b[: len(a)] for a, b in zip(sent, sent[1:])) and len(set(map(len, sent))) == len(sent)
    assert steps.served.tokenizer.decode(sent[-1]) == answer.text[: len(steps.served.tokenizer.decode(sent[-1]))]
