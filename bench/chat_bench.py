"""Conversation benchmark: what KV reuse and the on-disk feature cache save a person waiting for an answer.

On the synthetic 11B-width model of `bench/runtime_bench.py` (full vision tower), in one run:
- time to first token of a first turn with a new image, and of the second turn (only its new tokens
  are evaluated);
- reopening that conversation in a fresh model (as a new `lva ask --continue` or a restarted app does):
  time to first token with the image's features read from the disk cache vs encoding the image again.

    python bench/chat_bench.py --work /tmp/lva-bench --reuse          # reuses runtime_bench's converted pair
    python bench/chat_bench.py --write-docs
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, write_section  # noqa: E402
from synthetic_pair import FULL, QUICK, make_image, prepare_pair  # noqa: E402

from assistant import load_model  # noqa: E402
from assistant.chat.engine import ChatEngine, Conversation, Sampling  # noqa: E402
from assistant.chat.feature_cache import FeatureCache  # noqa: E402

PREAMBLE = ("## Conversations (`lva ask`, the chat engine)\n\n"
            "A new turn evaluates only its own tokens (the KV cache holds the rest), and an image's features are kept "
            "on disk, so reopening a conversation does not run the vision encoder again. To rerun (after "
            "`bench/runtime_bench.py` has built its model): `python bench/chat_bench.py --work /tmp/lva-bench "
            "--reuse --write-docs`.")


@dataclass
class FirstToken:
    label: str
    seconds: float
    evaluated_tokens: int
    prompt_tokens: int
    images_encoded: int


def first_token(engine: ChatEngine, conversation: Conversation, text: str, image: Path | None,
                label: str) -> FirstToken:
    """Seconds until the first answer token; the rest of the answer is generated but not timed."""
    model = engine.model
    encoded_before = model.images_encoded
    started = time.perf_counter()
    replies: list = []
    pieces = engine.send(conversation, text, image, on_reply=replies.append)
    elapsed = None
    for _ in pieces:
        elapsed = elapsed if elapsed is not None else time.perf_counter() - started
    reply = replies[-1]
    if elapsed is None:                              # an answer with no visible text: time the whole turn
        elapsed = reply.seconds
    result = FirstToken(label, elapsed, reply.evaluated_tokens, reply.prompt_tokens,
                        model.images_encoded - encoded_before)
    print(f"{label}: {elapsed:.2f} s to the first token ({result.evaluated_tokens} of {result.prompt_tokens} "
          f"prompt tokens evaluated, {result.images_encoded} encodes)", flush=True)
    return result


def reopen(text_gguf: Path, conversation: Conversation, cache: FeatureCache | None, label: str,
           threads: int) -> FirstToken:
    model = load_model(text_gguf, n_ctx=4096, n_threads=threads, feature_cache=cache)
    try:
        copy = Conversation(turns=list(conversation.turns), sampling=conversation.sampling)
        return first_token(ChatEngine(model), copy, "One more detail, please.", None, label)
    finally:
        model.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lva-bench")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    depth = QUICK if args.quick else FULL
    args.work.mkdir(parents=True, exist_ok=True)
    pair = prepare_pair(depth, args.work, args.threads, args.reuse)
    image_path = args.work / "chat-bench-4-tiles.png"
    make_image(1100, 1100, seed=7).save(image_path)
    cache = FeatureCache(Path(tempfile.mkdtemp(prefix="lva-feature-cache-")))
    sampling = Sampling(temperature=0.0, max_tokens=16)

    model = load_model(pair.text, n_ctx=4096, n_threads=args.threads, feature_cache=cache)
    engine = ChatEngine(model)
    conversation = Conversation(sampling=sampling)
    rows = [first_token(engine, conversation, "Describe this picture in detail.", image_path,
                        "first turn, new 4-tile image (encode + prefill)"),
            first_token(engine, conversation, "What stands out most?", None, "second turn (KV reuse)")]
    model.close()
    rows.append(reopen(pair.text, conversation, cache, "reopened, image features from the disk cache", args.threads))
    rows.append(reopen(pair.text, conversation, None, "reopened, image encoded again", args.threads))

    report = render(rows, depth, args.threads)
    print(report)
    if args.write_docs and not args.quick:
        write_section("chat", report, PREAMBLE)
    return 0


def render(rows: list[FirstToken], depth, threads: int) -> str:
    first, second, cached, encoded = rows
    lines = [
        f"Measured {datetime.date.today()} by `python bench/chat_bench.py --write-docs` on {machine()}, "
        f"{threads} threads, Q4_K_M text and cross layers, F16 vision tower; the synthetic model of the runtime "
        f"benchmark ({depth.describe()}). Greedy answers; time until the first piece of answer text is streamed "
        f"(these random weights often start with tokens that print nothing, so it can include a few decode steps).",
        "",
        "| turn | seconds to first text | prompt tokens | evaluated | vision encoder runs |",
        "|---|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(f"| {r.label} | {r.seconds:.2f} | {r.prompt_tokens} | {r.evaluated_tokens} | {r.images_encoded} |")
    lines += ["",
              f"Second turn / first: {second.seconds / first.seconds:.3f}. "
              f"Reopening from the feature cache / encoding again: {cached.seconds / encoded.seconds:.3f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
