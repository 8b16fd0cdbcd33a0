"""The worker: batches of equal decoder settings in arrival order, a bounded queue, cancellation,
draining on close, and a failing batch that does not stop the worker."""

import threading
import time

import pytest

from dlmc.serve.model import DecodeKey, Output
from dlmc.serve.worker import Closed, Job, QueueFull, Worker

A, B = DecodeKey("llada", "config a", 0), DecodeKey("llada", "config b", 0)


class Stub:
    """Stands in for ServedModel: records batches; the first waits for `go`."""

    class spec:
        mask_token_id = 3

    stops = frozenset({0})

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
