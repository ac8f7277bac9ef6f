"""Step-level batching of generation requests for the server.

One background thread owns the model and a `sampling.engine.Engine`. Requests wait in a bounded
queue; between two denoising steps the thread admits waiting requests into the running batch (up
to `max_batch` rows; with batching off, one request at a time), runs one step of every row, and
hands each request its events: every step's partial answer when it streams steps, and the final
answer. A finished request leaves the batch at once; a cancelled one (its client went away) leaves
at the next step. A request's answer does not depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from remask.pipeline import Generation, Pipeline
from remask.sampling import SamplerConfig, StepInfo
from remask.sampling.engine import Engine, Row


class QueueFull(Exception):
    """The server is at capacity: the client should retry later."""


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    sampler: SamplerConfig
    seed: int | None
    stream_steps: bool  # deliver every step's partial answer
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: Row | None = None
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload: Any) -> None:
        """Hand an event to the request's coroutine (called from the batching thread)."""
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class StepEvent:
    step: int
    ids: list[int]  # the answer positions (mask id where still masked)
    reveal_step: list[int]
    done: bool


class Batcher:
    def __init__(self, pipeline: Pipeline, *, max_batch: int = 16, max_queue: int = 64, batching: bool = True) -> None:
        self.pipe, self.max_batch, self.max_queue, self.batching = pipeline, max_batch, max_queue, batching
        self.engine = Engine(pipeline.model, mask_id=pipeline.tokenizer.mask_id,
                             vocab_size=pipeline.model.config.vocab_size, eos_ids=pipeline.stop_ids())
        self.pending: deque[Job] = deque()
        self.active: dict[int, Job] = {}  # id(row) -> job
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.completed = 0

    # --- the request side (the event loop's thread) ---------------------------------------------------
    def submit(self, job: Job) -> None:
        with self.lock:
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

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    # --- the batching thread ------------------------------------------------------------------------------
    def _admit(self) -> None:
        limit = self.max_batch if self.batching else 1
        while self.pending and len(self.active) < limit:
            job = self.pending.popleft()
            if job.cancelled.is_set():
                continue
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.pipe.device).manual_seed(seed)
            on_step = self._step_callback(job) if job.stream_steps else None
            try:
                job.row = self.engine.add(job.prompt_ids, job.sampler, generator=generator, on_step=on_step)
            except Exception as e:  # a request that cannot run must not stop the others
                job.emit("error", str(e))
                continue
            self.active[id(job.row)] = job

    def _step_callback(self, job: Job):
        P = len(job.prompt_ids)

        def on_step(info: StepInfo) -> None:
            job.emit("step", StepEvent(info.step, info.x[0, P:].tolist(), info.reveal_step[0, P:].tolist(), info.done))

        return on_step

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.pending and not self.active:
                    self.lock.wait(timeout=1.0)
                if self.stopping:
                    return
                self._admit()
            for key, job in list(self.active.items()):
                if job.cancelled.is_set():
                    self.engine.remove(job.row)
                    del self.active[key]
            if not self.engine.active:
                continue
            try:
                with torch.no_grad():
                    finished = self.engine.step()
            except Exception as e:  # an internal failure: fail the running requests, keep serving
                for job in self.active.values():
                    job.emit("error", f"internal error: {e}")
                    self.engine.remove(job.row)
                self.active.clear()
                continue
            for result in finished:
                job = self.active.pop(id(result.row), None)
                if job is None:
                    continue
                job.emit("done", self.pipe.answer(result.answer, result.answer_reveal_step))
                with self.lock:
                    self.completed += 1


def answer_tokens(generation: Generation) -> int:
    """Completion tokens: the answer up to its end-of-text (the end-of-text not counted)."""
    return len(generation.ids) - (1 if generation.ended else 0)
