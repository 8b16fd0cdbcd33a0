"""One thread owns the model (it is not thread-safe) and decodes queued requests in batches.

Requests wait in a bounded FIFO queue. When the worker is free it takes the oldest request and every
queued request with the same decoder, config and seed (up to `max_batch`), and decodes their prompts
as one left-padded batch: each row gets the tokens it gets alone, up to floating-point rounding.
Batches form at generation boundaries: a request that arrives while a batch runs joins the next
batch, not the running one at its next denoising step.

A job's result is a `concurrent.futures.Future`. Cancelling it drops a job still queued; a job that
already runs finishes with its batch and its result is discarded.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from dlmc.serve.model import DecodeKey, Output, ServedModel
from dlmc.serve.stream import settled


class QueueFull(Exception):
    """The queue holds max_queue requests."""


class Closed(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass(eq=False)
class Job:
    prompt: list[int]
    key: DecodeKey
    on_settled: Callable[[list[int]], None] | None = None
    """Called from the worker thread with the settled ids each time they grow (streaming requests)."""
    future: Future = field(default_factory=Future)  # -> Output


class Worker:
    def __init__(self, served: ServedModel, max_queue: int):
        self.served = served
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dlmc-serve-worker", daemon=True)
        self.running = 0  # rows of the batch being decoded
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        """Jobs waiting, not counting cancelled ones (they leave the queue at the next submit or batch)."""
        return sum(not job.future.cancelled() for job in list(self._queue))

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, jobs: list[Job]) -> None:
        """Queue all jobs (a request's prompts) or none of them."""
        with self._wake:
            if self._closing:
                raise Closed()
            self._drop_cancelled()
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull()
            self._queue.extend(jobs)
            self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs, decode every queued one, then stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _drop_cancelled(self) -> None:
        if any(job.future.cancelled() for job in self._queue):
            self._queue = deque(job for job in self._queue if not job.future.cancelled())

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:  # closing, and nothing left to drain
                    return
                batch = self._take()
            if batch:
                self._decode(batch)

    def _take(self) -> list[Job]:
        """The oldest live job and the queued jobs that can share its batch, in arrival order; marked
        running, so they can no longer be cancelled."""
        batch: list[Job] = []
        rest: deque[Job] = deque()
        for job in self._queue:
            if len(batch) < self.served.max_batch and (not batch or job.key == batch[0].key):
                if job.future.set_running_or_notify_cancel():  # False: cancelled while queued
                    batch.append(job)
            else:
                rest.append(job)
        self._queue = rest
        return batch

    def _decode(self, batch: list[Job]) -> None:
        self.running = len(batch)
        self.batch_sizes[len(batch)] += 1
        streaming = [job for job in batch if job.on_settled is not None]
        sent = [0] * len(batch)  # settled ids already reported, per row
        mask_id, stops = self.served.spec.mask_token_id, self.served.stops

        def on_canvas(generated: torch.Tensor) -> None:  # generated: [B, G] int64
            for b, (job, row) in enumerate(zip(batch, generated.tolist())):
                if job.on_settled is None:
                    continue
                ids, _ = settled(row, mask_id, stops)
                if len(ids) > sent[b]:
                    sent[b] = len(ids)
                    job.on_settled(ids)

        try:
            outputs: list[Output] | BaseException = self.served.run(
                [job.prompt for job in batch], batch[0].key, on_canvas if streaming else None
            )
        except Exception as e:  # the request checks should make this unreachable; the server stays up
            outputs = e
        finally:
            self.running = 0
        for i, job in enumerate(batch):
            if isinstance(outputs, BaseException):
                job.future.set_exception(outputs)
            else:
                job.future.set_result(outputs[i])
