"""Several answers decoded together: one llama.cpp context with a sequence per slot, and a scheduler that
evaluates every active slot's rows in one `llama_decode` per step (continuous batching, as llama-server's
slots do).

On a CPU a decoded token costs a read of every weight; decoding four sequences in one step reads them
once, so where reading the weights sets the pace the machine gives several answers in about the time of
one (where the arithmetic does, less: docs/PERFORMANCE.md). Each step:

1. admits waiting requests into free slots (the slot whose kept tokens share the longest prefix with the
   prompt, so a client resending its conversation has only the new turn evaluated);
2. runs one stage of an image encode a new request needs (a vision encoder layer: about a second on a
   2-core CPU), so streams already decoding keep producing tokens while it proceeds;
3. evaluates, in one batch, the next token of every decoding slot and a chunk of the prompts being
   prefilled (a long prompt goes in chunks, so it never stalls the others for long);
4. samples each slot's next token with its own samplers, streams it, and retires the slots that are done.

Each row of a batch sees its own sequence's image: the cross-attention hook finds the sequence of every
row (hook.py). A request that fails (a bad image, a prompt too long) fails alone. Not thread-safe but
`submit` and `AnswerHandle.cancel`: one thread runs `step` (the server's model worker, `lva batch`).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator, Sequence

import llama_cpp

from assistant.images import ImageSource
from assistant.runtime.errors import ModelError
from assistant.runtime.model import MllamaModel, reusable_prefix
from assistant.runtime.sampling import SamplingParams
from assistant.runtime.pieces import text_of

PREFILL_BESIDE_DECODE = 256          # prompt rows per step while other slots decode (their token latency)


@dataclass(frozen=True)
class Request:
    """One answer to produce."""

    token_ids: list[int]
    image: ImageSource | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    stop_at_end_of_turn: bool = True


@dataclass(frozen=True)
class Done:
    """The last event of an answer: why it ended (stop: end of turn; length: max_tokens or a full context;
    stopped: cancelled)."""

    reason: str


class AnswerHandle:
    """A submitted request's handle: its tokens arrive as the scheduler samples them."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.events: queue.Queue[int | Done | Exception] = queue.Queue()
        self.prompt_tokens_evaluated = 0         # what the slot's KV cache did not already hold
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """The client has gone: its slot is freed at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def tokens(self) -> Iterator[int]:
        """The sampled ids, until the answer ends; a failure is raised here."""
        while True:
            event = self.events.get()
            if isinstance(event, Done):
                self.done_reason = event.reason
                return
            if isinstance(event, Exception):
                raise event
            yield event


@dataclass
class Slot:
    """One sequence of the shared context."""

    seq: int
    answer: AnswerHandle | None = None
    cached: list[int] = field(default_factory=list)    # ids the KV cache holds for this sequence
    image_key: str | None = None                       # the image those ids saw
    pending: list[int] = field(default_factory=list)   # prompt ids still to evaluate
    last: int | None = None                            # the last sampled id, to evaluate next
    generated: int = 0
    sampler: object | None = None
    encoding: Generator | None = None                  # an image encode in progress: its stages
    ending: str | None = None                          # why it ends once `last` is evaluated (kept, as alone)

    @property
    def free(self) -> bool:
        return self.answer is None


class ParallelDecoder:
    def __init__(self, model: MllamaModel, n_parallel: int, n_ctx: int, n_batch: int = 512) -> None:
        """`n_parallel` slots of `n_ctx` tokens each (the context holds n_parallel x n_ctx)."""
        if n_parallel < 1:
            raise ModelError(f"--parallel must be at least 1 (got {n_parallel})")
        self.model, self.n_ctx, self.n_batch = model, n_ctx, n_batch
        self.slots = [Slot(seq) for seq in range(n_parallel)]
        self._ctx = model.new_context(n_parallel * n_ctx, sequences=n_parallel, n_batch=n_batch)
        self._waiting: queue.Queue[AnswerHandle] = queue.Queue()
        self._wake = threading.Event()

    # ------------------------------------------------------------------------------------------ other threads

    def submit(self, request: Request) -> AnswerHandle:
        answer = AnswerHandle(request)
        self._waiting.put(answer)
        self._wake.set()
        return answer

    def generate(self, token_ids: Sequence[int], image: ImageSource | None = None, max_tokens: int = 512,
                 stop: Sequence[str] = (), on_token: Callable[[int], None] | None = None,
                 on_evaluated: Callable[[int], None] | None = None, stop_at_end_of_turn: bool = True,
                 **sampling) -> Iterator[str]:
        """`MllamaModel.generate` through a slot: text pieces as the scheduler's thread samples them (this
        thread waits for them). Closing the generator early cancels the answer, freeing its slot."""
        request = Request(list(token_ids), image, SamplingParams(**sampling), max_tokens, stop_at_end_of_turn)
        answer = self.submit(request)
        try:
            yield from text_of(answer.tokens(), self.model.token_bytes, stop, on_token)
        finally:
            answer.cancel()                          # a no-op once it has ended
            if on_evaluated:
                on_evaluated(answer.prompt_tokens_evaluated)

    def run(self, stopping: threading.Event, idle: Callable[[], None] | None = None) -> None:
        """Step until `stopping` is set (a scheduler thread's body); `idle()` is called when there is nothing
        to do, before waiting for a request."""
        while not stopping.is_set():
            if not self.step():
                if idle:
                    idle()
                self.wait_for_work(0.5)

    def wait_for_work(self, timeout: float | None = None) -> None:
        """Block until a request arrives (or `timeout`), when no slot is busy."""
        if self.busy == 0 and self._waiting.empty():
            self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        """Make a waiting `wait_for_work` return (another thread has something for the scheduler's thread)."""
        self._wake.set()

    @property
    def busy(self) -> int:
        return sum(not slot.free for slot in self.slots)

    def held_positions(self) -> list[int]:
        """The last position each slot's sequence holds in the KV cache (-1: none)."""
        memory = llama_cpp.llama_get_memory(self._ctx)
        return [llama_cpp.llama_memory_seq_pos_max(memory, slot.seq) for slot in self.slots]

    # ------------------------------------------------------------------------------------------ the scheduler

    def step(self) -> bool:
        """One scheduling step (see the module's docstring); whether there was anything to do."""
        self._retire_cancelled()
        self._admit()
        encoding = next((slot for slot in self.slots if slot.encoding is not None), None)
        if encoding is not None and encoding.encoding is not None:
            self._encode_stage(encoding, encoding.encoding)
        rows = self._rows()
        if rows:
            self._evaluate(rows)
        return encoding is not None or bool(rows)

    def _admit(self) -> None:
        while not self._waiting.empty():
            free = [slot for slot in self.slots if slot.free]
            if not free:
                return
            answer = self._waiting.get()
            if answer.cancelled:
                answer.events.put(Done("stopped"))
                continue
            ids = answer.request.token_ids
            slot = max(free, key=lambda s: _common_prefix(s.cached, ids))
            try:
                self._start(slot, answer)
            except Exception as error:  # noqa: BLE001  (a request fails alone; the caller sees its error)
                self._release(slot)
                answer.events.put(error)

    def _start(self, slot: Slot, answer: AnswerHandle) -> None:
        request, model = answer.request, self.model
        ids = list(request.token_ids)
        if not ids:
            raise ModelError("the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise ModelError(f"the prompt has {len(ids)} tokens; the context holds {self.n_ctx}")
        model.check_tokens(ids, request.image)
        slot.answer, slot.generated, slot.last = answer, 0, None
        slot.sampler = model.new_sampler(request.sampling)
        image_key = model.image_key(request.image) if request.image is not None else None
        keep = reusable_prefix(slot.cached, slot.image_key, ids, image_key, model.image_token_id)
        model.forget(self._ctx, slot.seq, keep)
        slot.cached, slot.pending, slot.image_key = slot.cached[:keep], ids[keep:], image_key
        answer.prompt_tokens_evaluated = len(slot.pending)
        model.bind_image(slot.seq, None)
        if request.image is not None:
            slot.encoding = model.image_encoding(request.image)

    def _encode_stage(self, slot: Slot, encoding: Generator) -> None:
        """One stage of the slot's image encode; at its end the sequence sees the image."""
        try:
            next(encoding)
            return
        except StopIteration as finished:
            _, kv = finished.value
        except Exception as error:  # noqa: BLE001  (a bad image fails its request alone)
            self._fail(slot, error)
            return
        slot.encoding = None
        self.model.bind_image(slot.seq, kv, _handle(slot).request.token_ids.index(self.model.image_token_id))

    def _rows(self) -> list[tuple[Slot, list[int], bool]]:
        """(slot, ids to evaluate, whether its last row gives logits): each decoding slot's last token, then
        chunks of the prompts in prefill."""
        rows = [(slot, [slot.last], True) for slot in self.slots if slot.answer and slot.last is not None]
        budget = self.n_batch - len(rows)
        if rows:
            budget = min(budget, PREFILL_BESIDE_DECODE)
        for slot in self.slots:
            if slot.answer is None or not slot.pending or slot.encoding is not None or budget <= 0:
                continue
            chunk = slot.pending[:budget]
            rows.append((slot, chunk, len(chunk) == len(slot.pending)))
            budget -= len(chunk)
        return rows

    def _evaluate(self, rows: list[tuple[Slot, list[int], bool]]) -> None:
        try:
            outputs = self.model.evaluate(self._ctx, [(slot.seq, len(slot.cached), ids, logits)
                                                      for slot, ids, logits in rows])
        except Exception as error:  # noqa: BLE001  (llama.cpp refused the batch: every slot in it fails)
            for slot, _, _ in rows:
                self._fail(slot, error)
            return
        for (slot, ids, logits), index in zip(rows, outputs):
            slot.cached += ids
            if slot.pending:
                slot.pending = slot.pending[len(ids):]
            if slot.ending is not None:
                self._finish(slot, slot.ending)
            elif logits:
                self._sampled(slot, self.model.sample(slot.sampler, self._ctx, index))

    def _sampled(self, slot: Slot, token: int) -> None:
        answer = _handle(slot)
        request = answer.request
        if request.stop_at_end_of_turn and self.model.is_end_of_turn(token):
            self._finish(slot, "stop")
            return
        answer.events.put(token)
        slot.generated += 1
        if len(slot.cached) + 1 >= self.n_ctx:
            self._finish(slot, "length")                 # no room for it: it stays out of the KV cache
            return
        slot.last = token
        if slot.generated >= request.max_tokens:
            slot.ending = "length"                       # evaluated first, so a next turn finds it in the cache

    def _retire_cancelled(self) -> None:
        for slot in self.slots:
            if slot.answer is not None and slot.answer.cancelled:
                self._finish(slot, "stopped")

    def _finish(self, slot: Slot, reason: str) -> None:
        _handle(slot).events.put(Done(reason))
        self._release(slot)

    def _fail(self, slot: Slot, error: Exception) -> None:
        """A request that failed leaves nothing behind: its cells are freed, its image unbound."""
        answer = _handle(slot)
        self.model.forget(self._ctx, slot.seq, 0)
        slot.cached, slot.image_key = [], None
        self._release(slot)
        answer.events.put(error)

    def _release(self, slot: Slot) -> None:
        """The slot takes another request; its kept ids stay for one that shares their prefix."""
        self.model.bind_image(slot.seq, None)
        if slot.encoding is not None:
            slot.encoding.close()
        if slot.sampler is not None:
            llama_cpp.llama_sampler_free(slot.sampler)
        slot.answer, slot.sampler, slot.encoding, slot.last, slot.pending = None, None, None, None, []
        slot.ending = None

    def close(self) -> None:
        for slot in self.slots:
            if slot.answer is not None:
                self._finish(slot, "stopped")
        while not self._waiting.empty():
            self._waiting.get().events.put(Done("stopped"))
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


def _handle(slot: Slot) -> AnswerHandle:
    """The answer a busy slot produces."""
    if slot.answer is None:
        raise RuntimeError(f"slot {slot.seq} has no answer in progress")
    return slot.answer


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
