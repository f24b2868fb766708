"""The thread that owns the model: it loads the model requests name, and answers several of them together.

llama.cpp's context is not thread-safe and one model fills the memory, so one worker thread does all
model work: it loads the model a request names (in place of the loaded one, once the answers in progress
are done), and runs the `ParallelDecoder`, which decodes up to `--parallel` answers in one batch per step.
Each request's answer is written by a thread of its own through the chat engine (prompt, template, text
pieces, stop strings), waiting on the tokens the worker samples for it, and each piece of text goes to the
request's event loop. A request whose client has gone is dropped before it starts; one whose client leaves
mid-answer stops at the next piece, and its slot is free at the next step.

The worker keeps the last conversations it answered: a client that resends one with one more turn, as every
chat client does, has only the new turn evaluated (`Conversation.take_transcript`); each slot's KV cache
reuses the longest shared token prefix in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections import deque
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from assistant.chat.engine import ChatEngine, Conversation, Reply, Sampling
from assistant.runtime import capacity
from assistant.runtime.parallel import ParallelDecoder
from assistant.server.catalog import ServedModel
from models.errors import LvaError

if TYPE_CHECKING:
    from assistant.runtime import MllamaModel


class LoadError(LvaError):
    """The model file could not be loaded: a problem on the server's side, not in the request (nor a bug)."""

    http_status = 500


@dataclass
class RawPrompt:
    """Ollama's `raw` generate: the prompt is used as written, no chat template."""

    text: str
    image: bytes | None
    sampling: Sampling


@dataclass
class Work:
    """One request, as the worker runs it."""

    model: ServedModel
    task: Conversation | RawPrompt | None       # None: only load the model (or unload it, keep_alive 0)
    num_ctx: int | None = None                   # context length; None: the server's --ctx
    keep_alive: float | None = None              # seconds the model stays loaded after; None or < 0: for good


@dataclass
class Piece:
    text: str


@dataclass
class Finished:
    model: str
    reply: Reply | None                          # None for a load or an unload
    done_reason: str                             # stop | length | stopped | load | unload
    load_seconds: float
    total_seconds: float                         # from the moment the request was queued
    images_encoded: int = 0


@dataclass
class Failed:
    error: Exception


Event = Piece | Finished | Failed


@dataclass(eq=False)
class Job:
    """A request in the queue; its events arrive on the event loop that submitted it."""

    work: Work
    loop: asyncio.AbstractEventLoop | None       # None: nobody waits (the load at start-up)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: asyncio.Event = field(default_factory=asyncio.Event)     # the worker is through with it
    cancelled: threading.Event = field(default_factory=threading.Event)
    outcome: Finished | Failed | None = None     # None while queued or running, and when dropped
    dropped: bool = False
    queued_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """The client has gone: drop the job if it waits, stop it at the next piece if it runs."""
        self.cancelled.set()

    async def rest(self) -> tuple[str, Finished | Failed]:
        """The text of the pieces still to come, and how the job ended."""
        text = ""
        while not isinstance(event := await self.events.get(), (Finished, Failed)):
            text += event.text
        return text, event

    def emit(self, event: Event) -> None:
        """From the worker thread: hand `event` to the request's event loop (the last one is its outcome)."""
        if isinstance(event, (Finished, Failed)):
            self.outcome = event
        self._call(self.events.put_nowait, event)

    def finish(self, dropped: bool = False) -> None:
        """From the worker thread: it is through with this job (`dropped`: without running it)."""
        self.dropped = dropped
        self._call(self.done.set)

    def _call(self, function: Callable, *args) -> None:
        if self.loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is stopping
            self.loop.call_soon_threadsafe(function, *args)


class ModelWorker:
    def __init__(self, load: Callable[[Path], MllamaModel], n_ctx: int, log: Callable[[str], None],
                 parallel: int = 1) -> None:
        """`load(text_gguf)` loads a model with the command line's options; `n_ctx` is the default context of
        each of the `parallel` sequences answered together."""
        self._load, self.n_ctx, self._log, self.parallel = load, n_ctx, log, parallel
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="lva-model-worker", daemon=True)
        self.loaded: ServedModel | None = None
        self.expires_at: float | None = None     # wall-clock time the model unloads; None: stays
        self._model: MllamaModel | None = None
        self._decoder: ParallelDecoder | None = None
        self._engine: ChatEngine | None = None
        self._waiting: deque[Job] = deque()      # jobs that wait for the answers in progress to end
        self._answering: set[threading.Thread] = set()
        self._recent: deque[Conversation] = deque(maxlen=2 * parallel)
        self._lock = threading.Lock()            # _answering and _recent, shared with the answers' threads
        self._wake = threading.Event()
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)
        self._wake_up()

    def stop(self) -> None:
        """Stop after the jobs in the queue (at shutdown their clients have gone, so they are dropped), and free
        the model."""
        self._jobs.put(None)
        self._wake_up()
        self._thread.join()

    @property
    def context_length(self) -> int:
        model = self._model                      # read once: the worker thread may unload it meanwhile
        return model.n_ctx if model is not None else self.n_ctx

    @property
    def slots_in_use(self) -> int:
        decoder = self._decoder
        return decoder.busy if decoder is not None else 0

    def _wake_up(self) -> None:
        self._wake.set()
        decoder = self._decoder
        if decoder is not None:
            decoder.wake()

    # ------------------------------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        while not (self._stopping and self._idle):
            self._take_jobs()
            if self._start_waiting():
                continue
            if self._decoder is not None and self._decoder.step():
                continue
            if self._idle and self.expires_at is not None and time.time() >= self.expires_at:
                self._unload()                   # keep_alive ran out
            self._wake.wait(self._wait_seconds())
            self._wake.clear()
        for job in self._waiting:
            job.finish(dropped=True)
        self._unload()

    def _wait_seconds(self) -> float:
        """How long the worker may sleep: until keep_alive runs out, or a while (an answer's thread may end
        without a job to wake it)."""
        if self.expires_at is None or not self._idle:
            return 0.5
        return max(0.0, min(0.5, self.expires_at - time.time()))

    @property
    def _idle(self) -> bool:
        with self._lock:
            self._answering = {thread for thread in self._answering if thread.is_alive()}
            return not self._answering

    def _take_jobs(self) -> None:
        """Move the submitted jobs into the waiting line."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self._stopping = True
            else:
                self._waiting.append(job)

    def _start_waiting(self) -> bool:
        """Start the waiting jobs in order: answers the loaded model takes while a slot is free, and a job that
        needs the model to itself once nothing is being answered; whether one started."""
        for job in [job for job in self._waiting if job.cancelled.is_set()]:
            self._waiting.remove(job)                  # its client left while it waited
            job.finish(dropped=True)
        if not self._waiting:
            return False
        job = self._waiting[0]
        with self._lock:
            answering = sum(thread.is_alive() for thread in self._answering)
        if self._ready_for(job):
            if answering >= self.parallel:
                return False
            self._start_answer(self._waiting.popleft(), 0.0)
            return True
        if answering:
            return False
        self._run_alone(self._waiting.popleft())
        return True

    def _ready_for(self, job: Job) -> bool:
        """Whether `job` is an answer the loaded model and its decoder take as they are."""
        work = job.work
        return (work.task is not None and self.loaded is not None and self.loaded.text == work.model.text
                and self._decoder is not None and self._decoder.n_ctx == self._context_for(work))

    def _context_for(self, work: Work) -> int:
        model = self._model
        trained = model.n_ctx_train if model is not None else self.n_ctx
        return min(work.num_ctx or self.n_ctx, max(self.n_ctx, trained))

    def _run_alone(self, job: Job) -> None:
        """A job that needs the model to itself: a load, an unload, another model, another context length."""
        if job.cancelled.is_set():
            job.finish(dropped=True)
            return
        work = job.work
        try:
            load_seconds = self._ensure(work)
        except LvaError as error:                      # the model file's: app.py says it
            job.emit(Failed(error))
            job.finish()
            return
        except Exception as error:  # noqa: BLE001  (a bug: logged whole; the worker outlives every request)
            self._log("internal error, a bug in lva:\n" + "".join(traceback.format_exception(error)).rstrip())
            job.emit(Failed(error))
            job.finish()
            return
        if work.task is not None:
            self._start_answer(job, load_seconds)
            return
        reason = "unload" if work.keep_alive == 0 else "load"
        if work.keep_alive == 0:
            self._unload()
        self._keep_alive(work.keep_alive)
        job.emit(Finished(work.model.name, None, reason, load_seconds, self._since(job)))
        job.finish()

    def _start_answer(self, job: Job, load_seconds: float) -> None:
        thread = threading.Thread(target=self._answer_thread, args=(job, load_seconds), name="lva-answer",
                                  daemon=True)
        with self._lock:
            self._answering.add(thread)
        thread.start()

    # ------------------------------------------------------------------------------------------ an answer's thread

    def _answer_thread(self, job: Job, load_seconds: float) -> None:
        work = job.work
        try:
            assert work.task is not None
            last: Finished | Failed = self._answer(job, work.task, load_seconds)
        except LvaError as error:                      # the request's: app.py says it
            last = Failed(error)
        except Exception as error:  # noqa: BLE001  (a bug: logged whole; the worker outlives every request)
            self._log("internal error, a bug in lva:\n" + "".join(traceback.format_exception(error)).rstrip())
            last = Failed(error)
        self._keep_alive(work.keep_alive)              # before the answer ends: then /api/ps already agrees
        job.emit(last)
        job.finish()
        self._wake.set()

    def _answer(self, job: Job, task: Conversation | RawPrompt, load_seconds: float) -> Finished:
        work, model, engine = job.work, self._model, self._engine
        assert model is not None and engine is not None          # loaded before the job started
        encoded_before = model.images_encoded
        replies: list[Reply] = []
        if isinstance(task, RawPrompt):
            pieces = engine.complete(task.text, task.image, task.sampling, replies.append)
        else:
            with self._lock:
                for previous in reversed(self._recent):
                    task.take_transcript(previous)
                    if task.transcript:
                        break
                self._recent.append(task)
            pieces = engine.answer(task, replies.append)
        try:
            for piece in pieces:
                job.emit(Piece(piece))
                if job.cancelled.is_set():
                    break
        finally:
            pieces.close()
        reply = replies[-1]
        return Finished(work.model.name, reply, reply.done_reason, load_seconds, self._since(job),
                        model.images_encoded - encoded_before)

    # ------------------------------------------------------------------------------------------ the model

    def _ensure(self, work: Work) -> float:
        """Load `work.model` unless it is loaded, with a decoder of the context it asks for; the seconds it took."""
        wanted = work.model
        start = time.perf_counter()
        if self.loaded is None or self.loaded.text != wanted.text:
            self._unload()
            files = [path for path in (wanted.text, wanted.vision) if path is not None]
            try:
                capacity.sequences_that_fit(files, self.n_ctx, self.parallel)
                model = self._load(wanted.text)
            except (LvaError, OSError) as error:       # a broken or missing file, no memory: said in one line
                self._log(f"error: {wanted.name} could not be loaded: {error}")
                raise LoadError(f"{wanted.name} could not be loaded: {error}") from error
            self._model, self.loaded = model, wanted
            self._log(f"loaded {wanted.name} in {time.perf_counter() - start:.2f} s")
        n_ctx = self._context_for(work)
        if self._decoder is None or self._decoder.n_ctx != n_ctx:
            self._new_decoder(n_ctx)
        return time.perf_counter() - start

    def _new_decoder(self, n_ctx: int) -> None:
        model = self._model
        assert model is not None
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = self._engine = None
        try:
            model.set_context_length(n_ctx)              # the engine's limits: each sequence's context
            self._decoder = ParallelDecoder(model, self.parallel, n_ctx)
            self._engine = ChatEngine(model, decoder=self._decoder)
        except LvaError as error:
            self._unload()
            raise LoadError(str(error)) from error

    def _unload(self) -> None:
        self.expires_at = None
        model, loaded = self._model, self.loaded
        if model is None or loaded is None:
            return
        if self._decoder is not None:
            self._decoder.close()
        model.close()
        self._model = self._decoder = self._engine = self.loaded = None
        self._recent.clear()
        self._log(f"unloaded {loaded.name}")

    def _keep_alive(self, seconds: float | None) -> None:
        if self._model is None:
            return
        if seconds == 0:
            self.expires_at = time.time()            # unloaded as soon as nothing else is being answered
        else:
            self.expires_at = None if seconds is None or seconds < 0 else time.time() + seconds

    @staticmethod
    def _since(job: Job) -> float:
        return time.perf_counter() - job.queued_at
