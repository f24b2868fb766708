"""The one thread that owns the model: requests wait in its queue and are answered one at a time.

llama.cpp's context is not thread-safe and one model fills the memory, so a single worker thread does all
model work: it loads the model a request names (in place of the loaded one), answers through the chat
engine, and hands each piece of text to the request's event loop. A request whose client has gone is
dropped when its turn comes; one whose client leaves mid-answer stops at the next piece.

The worker keeps the last conversation it answered: a client that resends it with one more turn, as every
chat client does, has only the new turn evaluated (`Conversation.take_transcript`); the runtime's KV cache
reuses the longest shared token prefix in any case.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from assistant.chat.engine import ChatEngine, Conversation, Reply, Sampling
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
    def __init__(self, load: Callable[[Path], MllamaModel], n_ctx: int, log: Callable[[str], None]) -> None:
        """`load(text_gguf)` loads a model with the command line's options; `n_ctx` is the default context."""
        self._load, self.n_ctx, self._log = load, n_ctx, log
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="lva-model-worker", daemon=True)
        self.loaded: ServedModel | None = None
        self.expires_at: float | None = None     # wall-clock time the model unloads; None: stays
        self._model: MllamaModel | None = None
        self._engine: ChatEngine | None = None
        self._last: Conversation | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        """Stop after the jobs in the queue (at shutdown their clients have gone, so they are dropped), and free
        the model."""
        self._jobs.put(None)
        self._thread.join()

    @property
    def context_length(self) -> int:
        model = self._model                      # read once: the worker thread may unload it meanwhile
        return model.n_ctx if model is not None else self.n_ctx

    # ------------------------------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        while True:
            timeout = None if self.expires_at is None else max(0.0, self.expires_at - time.time())
            try:
                job = self._jobs.get(timeout=timeout)
            except queue.Empty:                  # keep_alive ran out
                self._unload()
                continue
            if job is None:
                break
            if job.cancelled.is_set():
                job.finish(dropped=True)
                continue
            try:
                self._run(job)
            finally:
                job.finish()
        while not self._jobs.empty():
            job = self._jobs.get()
            if job is not None:
                job.finish(dropped=True)
        self._unload()

    def _run(self, job: Job) -> None:
        work = job.work
        try:
            load_seconds = self._ensure(work.model)
            if work.task is None:
                reason = "unload" if work.keep_alive == 0 else "load"
                last: Finished | Failed = Finished(work.model.name, None, reason, load_seconds, self._since(job))
            else:
                last = self._answer(job, work.task, load_seconds)
        except LvaError as error:                      # the request's (or the model file's): app.py says it
            last = Failed(error)
        except Exception as error:  # noqa: BLE001  (a bug: logged whole; the worker outlives every request)
            self._log("internal error, a bug in lva:\n" + "".join(traceback.format_exception(error)).rstrip())
            last = Failed(error)
        self._keep_alive(work.keep_alive)              # before the answer ends: then /api/ps already agrees
        job.emit(last)

    def _answer(self, job: Job, task: Conversation | RawPrompt, load_seconds: float) -> Finished:
        work, model, engine = job.work, self._model, self._engine
        assert model is not None and engine is not None          # _ensure has just loaded them
        model.set_context_length(min(work.num_ctx or self.n_ctx, max(self.n_ctx, model.n_ctx_train)))
        encoded_before = model.images_encoded
        replies: list[Reply] = []
        if isinstance(task, RawPrompt):
            pieces = engine.complete(task.text, task.image, task.sampling, replies.append)
        else:
            if self._last is not None:
                task.take_transcript(self._last)
            self._last = task
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

    def _ensure(self, wanted: ServedModel) -> float:
        """Load `wanted` unless it is loaded; the seconds it took."""
        if self.loaded is not None and self.loaded.text == wanted.text:
            return 0.0
        self._unload()
        start = time.perf_counter()
        try:
            model = self._load(wanted.text)
        except (LvaError, OSError) as error:           # a broken or missing file, no memory: said in one line
            self._log(f"error: {wanted.name} could not be loaded: {error}")
            raise LoadError(f"{wanted.name} could not be loaded: {error}") from error
        try:
            engine = ChatEngine(model)
        except Exception:
            model.close()
            raise
        self._model, self._engine, self.loaded = model, engine, wanted
        seconds = time.perf_counter() - start
        self._log(f"loaded {wanted.name} in {seconds:.2f} s")
        return seconds

    def _unload(self) -> None:
        self.expires_at = None
        model, loaded = self._model, self.loaded
        if model is None or loaded is None:
            return
        model.close()
        self._model = self._engine = self.loaded = self._last = None
        self._log(f"unloaded {loaded.name}")

    def _keep_alive(self, seconds: float | None) -> None:
        if seconds == 0:
            self._unload()
        elif self._model is not None:
            self.expires_at = None if seconds is None or seconds < 0 else time.time() + seconds

    @staticmethod
    def _since(job: Job) -> float:
        return time.perf_counter() - job.queued_at
