"""Step-level batching of generation requests for the server.

One background thread owns the model and a `sampling.engine.Engine`, and uses only its public
interface (`add` gives a row handle, `step` the `RowResult`s of the rows that finished, `remove`
drops a row). Requests wait in a bounded queue; between two denoising steps the thread admits
waiting requests into the running batch (up to `max_batch` rows; with batching off, one at a time),
runs one step of every row, and hands each request its events: every step's partial answer when it
streams steps, then the answer (or a failure). A finished request leaves the batch at once; a
cancelled one (its client went away) leaves before the next step. A request's answer does not
depend on what it was batched with.

Stopping (Ctrl-C) is noticed between two steps: every request still running or waiting gets a
503 failure, so its coroutine ends and the server can shut down without waiting for long answers.
Nothing outlives its request, and reference counting alone frees it: a job never holds its row
(the row's `on_step` holds the job, so the reverse link would make a cycle, and every finished row's
tensors would wait for the cyclic collector's rare full passes: memory grew round after round), and
the thread keeps no job once it has delivered its answer.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from remask.errors import RemaskError
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig, StepInfo
from remask.sampling.engine import Engine, Row, RowResult

SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """The server is at capacity: the client should retry later."""


@dataclass(frozen=True)
class Partial:
    """A step's partial answer: the answer positions (mask id where still masked) and the step that
    revealed each (-1: not yet)."""

    step: int
    ids: list[int]
    reveal_step: list[int]


@dataclass(frozen=True)
class Finished:
    """The sampled answer positions (not yet cut at end-of-text) and their reveal steps."""

    ids: list[int]
    reveal_step: list[int]


@dataclass(frozen=True)
class Failed:
    message: str
    status: int = 500


Event = Partial | Finished | Failed


@dataclass(eq=False)
class Job:
    """One request's work, shared by its coroutine (which awaits `events`) and the batching thread."""

    prompt_ids: list[int]
    sampler: SamplerConfig
    seed: int | None
    stream_steps: bool  # deliver every step's partial answer
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, event: Event) -> None:
        """Hand an event to the request's coroutine (thread-safe); nothing once cancelled."""
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class Batcher:
    def __init__(self, pipeline: Pipeline, *, max_batch: int = 16, max_queue: int = 64, batching: bool = True) -> None:
        self.pipe, self.max_batch, self.max_queue, self.batching = pipeline, max_batch, max_queue, batching
        self.engine = Engine(pipeline.model, mask_id=pipeline.tokenizer.mask_id,
                             vocab_size=pipeline.model.config.vocab_size, eos_ids=pipeline.stop_ids())
        self.pending: deque[Job] = deque()
        self.active: dict[Row, Job] = {}  # the engine's row handle -> its request
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.completed = 0

    # --- the request side (the event loop's thread) ---------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when the queue is full. Once stopping, the job fails at once (503)."""
        with self.lock:
            if self.stopping:
                job.emit(Failed(SHUTTING_DOWN, 503))
                return
            if len(self.pending) >= self.max_queue:
                raise QueueFull()
            self.pending.append(job)
            self.lock.notify()

    def load(self) -> dict:
        with self.lock:
            return {"active": len(self.active), "queued": len(self.pending), "completed": self.completed,
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "batching": self.batching}

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="remask-batcher", daemon=True)
        self.thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop after its current step; safe in a signal handler (takes no lock)."""
        self.stopping = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (after its current step) and wait for it; running and waiting requests fail."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=timeout)

    # --- the batching thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._next():
                self._step()
        finally:
            with self.lock:
                jobs = [*self.active.values(), *self.pending]
                self.active.clear()
                self.pending.clear()
            for job in jobs:
                job.emit(Failed(SHUTTING_DOWN, 503))

    def _next(self) -> bool:
        """Wait for work and admit waiting jobs; False once stopping."""
        with self.lock:
            while not self.stopping and not self.pending and not self.active:
                self.lock.wait(timeout=0.5)
            if self.stopping:
                return False
            self._admit()
            for row in [row for row, job in self.active.items() if job.cancelled.is_set()]:
                self.engine.remove(row)
                del self.active[row]
        return True

    def _admit(self) -> None:
        limit = self.max_batch if self.batching else 1
        while self.pending and len(self.active) < limit:
            job = self.pending.popleft()
            if job.cancelled.is_set():
                continue
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            generator = self.pipe.generator(seed)
            on_step = _partials(job) if job.stream_steps else None
            try:
                row = self.engine.add(job.prompt_ids, job.sampler, generator=generator, on_step=on_step)
            except Exception as e:  # a request that cannot run must not stop the others
                job.emit(Failed(str(e), 400 if isinstance(e, RemaskError) else 500))
                continue
            self.active[row] = job

    def _step(self) -> None:
        """One step of every running row; the finished rows' answers go to their requests."""
        if not self.engine.active:
            return
        try:
            with torch.no_grad():
                finished = self.engine.step()
        except Exception as e:  # an internal failure: fail the running requests, keep serving
            with self.lock:
                failed, self.active = self.active, {}
            for row, job in failed.items():
                self.engine.remove(row)
                job.emit(Failed(f"internal error: {e}"))
            return
        self._deliver(finished)

    def _deliver(self, finished: list[RowResult]) -> None:
        with self.lock:
            jobs = [(self.active.pop(result.row, None), result) for result in finished]
            self.completed += sum(job is not None for job, _ in jobs)
        for job, result in jobs:
            if job is not None:
                job.emit(Finished(result.answer, result.answer_reveal_step))


def _partials(job: Job):
    """The row's `on_step`: each step's partial answer to the request (it holds the job until the
    engine drops the row)."""
    P = len(job.prompt_ids)

    def on_step(info: StepInfo) -> None:
        job.emit(Partial(info.step, info.x[0, P:].tolist(), info.reveal_step[0, P:].tolist()))

    return on_step
