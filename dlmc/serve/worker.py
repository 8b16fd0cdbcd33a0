"""One thread owns the model (it is not thread-safe) and decodes queued requests in batches.

Requests wait in a bounded FIFO queue; every row of a batch gets the tokens it gets alone, up to
floating-point rounding. Two ways to batch, chosen by the model (`ServedModel.steps_rows`):

* Step-level (a compiled artifact with LLaDA's rule fused into its step): the worker drives one
  `dlmc.runtime.loop.Decoding` across requests. Before every denoising step, queued requests join
  the running batch (up to `max_batch` rows), in arrival order; a row leaves the step it finishes (its
  gen_length done, or stop at EOS) and its answer is sent at once, while the others go on. Rows may
  differ in prompt, max_tokens (gen_length), steps, stop_at_eos and seed; they must share block_length,
  temperature, remasking, threshold and factor (`loop.share_key`). The oldest queued request that
  cannot share the running batch's settings waits for the batch to empty, and the requests behind it
  wait too, so it is never overtaken for long.
* Generation boundaries (every other model: eager checkpoints, unfused artifacts, fused Dream steps):
  when the worker is free it takes the oldest request and every queued request with the same decoder,
  config and seed (up to `max_batch`) and decodes them as one batch; a request arriving meanwhile
  joins the next batch.

A job's result is a `concurrent.futures.Future`. `Job.cancel` drops a job still queued; a running one
leaves a step-level batch at the next step, and finishes with a boundary batch, its result discarded.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import torch

from dlmc.decoding.common import fill_undecided
from dlmc.errors import DlmcError
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
    abandoned: bool = False
    """Set by `cancel`: nobody reads the result any more."""

    def cancel(self) -> None:
        """The client went away: a queued job is dropped, a running one leaves (or is discarded)."""
        self.abandoned = True
        self.future.cancel()


class Worker:
    def __init__(self, served: ServedModel, max_queue: int):
        self.served = served
        self.max_queue = max_queue
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dlmc-serve-worker", daemon=True)
        self.running = 0  # rows of the batch being decoded
        self.batch_sizes: Counter[int] = Counter()
        """How many batches (generation boundaries) or denoising steps (step-level) ran with each number of rows."""

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
        if self.served.steps_rows:
            self._run_steps()
            return
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

    # ---------------------------------------------------------------------------------------------
    # step-level batching
    # ---------------------------------------------------------------------------------------------

    def _run_steps(self) -> None:
        decoding = self.served.decoding()
        live: dict[int, tuple[Job, list[int]]] = {}  # handle -> (job, [settled ids already reported])
        while True:
            with self._wake:
                while not self._queue and not live and not self._closing:
                    self._wake.wait()
                if not self._queue and not live:  # closing, and nothing left to drain
                    return
                self._join(decoding, live)
            for handle, (job, _) in list(live.items()):
                if job.abandoned:  # its client went away: it leaves the batch now
                    decoding.drop(handle)
                    del live[handle]
                    job.future.set_exception(CancelledError())
            if not live:
                continue
            self.running = len(decoding)
            self.batch_sizes[len(decoding)] += 1
            try:
                with torch.inference_mode():
                    finished = decoding.step()
            except Exception as e:  # the request checks should make this unreachable; the server stays up
                for job, _ in live.values():
                    job.future.set_exception(e)
                live.clear()
                decoding = self.served.decoding()
                continue
            finally:
                self.running = len(decoding)
            self._stream(decoding, live)
            for row in finished:
                job, _ = live.pop(row.handle)
                job.future.set_result(self.served.output(fill_undecided(row.generated, self.served.spec), row.nfe))

    def _join(self, decoding, live: dict) -> None:
        """Queued jobs join the batch in arrival order, until it is full or a job cannot share its settings."""
        while self._queue and len(decoding) < self.served.max_batch:
            job = self._queue[0]
            if not job.future.cancelled() and not decoding.accepts(job.key.config):
                return
            self._queue.popleft()
            if job.future.set_running_or_notify_cancel():  # False: cancelled while queued
                try:
                    live[decoding.add(job.prompt, job.key.config, job.key.seed)] = (job, [0])
                except DlmcError as e:  # the request checks should make this unreachable
                    job.future.set_exception(e)

    def _stream(self, decoding, live: dict) -> None:
        """Each streaming row's settled prefix, when it grew this step."""
        mask_id, stops = self.served.spec.mask_token_id, self.served.stops
        for handle, generated in zip(decoding.handles, decoding.generated()):
            job, sent = live[handle]
            callback = job.on_settled  # read once: the request may unhook it meanwhile
            if callback is None:
                continue
            ids, _ = settled(generated.tolist(), mask_id, stops)
            if len(ids) > sent[0]:
                sent[0] = len(ids)
                callback(ids)
