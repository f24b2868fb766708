"""Prefill and decode timed: lva's runtime (with the time inside its cross-attention hook) and stock llama.cpp on
the same text GGUF."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import llama_cpp
import numpy as np

from models import ggml

N_CTX = 1024
STOCK_LABEL = "stock llama.cpp, text only"


@dataclass
class Rate:
    """Prefill and decode of one configuration; the best of `repeats` runs of each."""

    label: str
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    hook: HookTime | None = None

    @property
    def prefill_rate(self) -> float:
        return self.prompt_tokens / self.prefill_seconds

    @property
    def decode_rate(self) -> float:
        return self.decode_tokens / self.decode_seconds


@dataclass
class HookTime:
    """Time inside the cb_eval callback while decoding, and how much of it was ggml running cross layers."""

    tokens: int
    calls: int
    callback_seconds: float
    graph_seconds: float             # scratch.run of the cross-layer graphs: real work, not overhead

    @property
    def python_seconds(self) -> float:
        return self.callback_seconds - self.graph_seconds


def build_prompts(model, n_tokens: int) -> tuple[list[int], list[int]]:
    """A chat-formatted prompt of exactly n_tokens with `<|image|>` near the start, and the same without it.

    The text-only prompt swaps the image token for an ordinary one, so every configuration evaluates
    the same number of rows.
    """
    head = model.tokenize("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>")
    sentence = "Describe the picture in detail, then list every object you can see in it and its colour. "
    body = model.tokenize(sentence * (1 + n_tokens // 16))
    image_ids = (head + body)[:n_tokens]
    filler = model.tokenize("\n")[0]
    text_ids = [filler if t == model.image_token_id else t for t in image_ids]
    return image_ids, text_ids


class CallbackTimer:
    """Wraps a function: counts calls and the wall time spent inside them."""

    def __init__(self, function: Callable) -> None:
        self.function = function
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started
            self.calls += 1

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0


@dataclass
class HookTimer:
    callback: CallbackTimer          # the hook's cb_eval callback
    graphs: CallbackTimer            # every ggml.Scratch.run in the process


def install_hook_timer(model) -> HookTimer:
    """Time the cb_eval callback and, inside it, the ggml runs of the cross-layer graphs.

    The hook's callback is routed through a timing wrapper; contexts take it when they are created,
    lazily, on first use.
    The hook runs its cross-layer graphs through `ggml.Scratch.run`, which is wrapped for the whole
    class: while decoding with an already encoded image nothing else runs graphs, so that time is the
    cross layers' arithmetic (real work), and the rest of the callback's time is Python bookkeeping
    (the overhead). The ctypes transitions into and out of the callback are outside both timers; the
    text-only row against stock llama.cpp shows their cost.
    """
    if model.has_context:
        raise RuntimeError("the hook timer must be installed before the runtime creates its llama.cpp context")
    callback = CallbackTimer(model.hook.on_node)
    model.hook.route_callback(callback)
    graphs = CallbackTimer(ggml.Scratch.run)
    ggml.Scratch.run = lambda scratch, graph, inputs=None: graphs(scratch, graph, inputs)
    return HookTimer(callback, graphs)


def runtime_once(model, timer: HookTimer, label: str, ids: list[int], image, decode_tokens: int) -> Rate:
    """Prefill = time to the first token (the image is already encoded: a cache hit); decode = the rest.

    After the first token, each step of generate_tokens evaluates the previous token and samples the
    next; the generator's last step evaluates the last token before stopping, so `decode_tokens + 1`
    tokens asked for make `decode_tokens + 1` evaluations after the prompt, which is the count used.
    """
    model.forget_context()
    tokens = model.generate_tokens(ids, image=image, max_tokens=decode_tokens + 1, temperature=0,
                                   stop_at_end_of_turn=False)
    started = time.perf_counter()
    next(tokens)
    prefilled = time.perf_counter()
    timer.callback.reset()
    timer.graphs.reset()
    steps = sum(1 for _ in tokens) + 1
    decoded = time.perf_counter()
    hook = HookTime(steps, timer.callback.calls, timer.callback.seconds, timer.graphs.seconds)
    return _report(Rate(label, len(ids), prefilled - started, steps, decoded - prefilled, hook))


def _report(rate: Rate) -> Rate:
    hook = "" if rate.hook is None else (f", hook {1000 * rate.hook.callback_seconds / rate.hook.tokens:.2f} "
                                         f"ms/token ({1000 * rate.hook.python_seconds / rate.hook.tokens:.2f} Python)")
    print(f"  {rate.label}: prefill {rate.prefill_rate:.1f} tok/s, decode {rate.decode_rate:.2f} tok/s{hook}",
          flush=True)
    return rate


def best_rate(runs: list[Rate]) -> Rate:
    """The fastest prefill and the fastest decode, which may come from different runs."""
    prefill = min(runs, key=lambda r: r.prefill_seconds)
    decode = max(runs, key=lambda r: r.decode_rate)
    return Rate(prefill.label, prefill.prompt_tokens, prefill.prefill_seconds, decode.decode_tokens,
                decode.decode_seconds, decode.hook)


class StockLlama:
    """Stock llama-cpp-python on the same text GGUF, no hook: `Llama.eval`, greedy on llama.cpp's logits.

    `Llama` is built as a user would build it (every layer offloaded, as lva does, on a GPU build; its
    defaults otherwise); the argmax over the last row's logits is the greedy step (our runtime uses
    llama.cpp's greedy sampler, the same work).
    """

    def __init__(self, text_path: Path, threads: int) -> None:
        self.llm = llama_cpp.Llama(str(text_path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                                   n_gpu_layers=-1, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.llm.eval([self.llm.token_bos()] * 8)              # creates the compute buffers, touches the weights

    def _greedy(self) -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def once(self, ids: list[int], decode_tokens: int) -> Rate:
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(ids)
        token = self._greedy()
        prefilled = time.perf_counter()
        for _ in range(decode_tokens + 1):
            self.llm.eval([token])
            token = self._greedy()
        decoded = time.perf_counter()
        return _report(Rate(STOCK_LABEL, len(ids), prefilled - started, decode_tokens + 1, decoded - prefilled))

    def close(self) -> None:
        self.llm.close()
