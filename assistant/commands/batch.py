"""`lva batch IN.jsonl --out OUT.jsonl`: many questions, one JSON line of answer each, resumable.

Each output line is written whole (one write, flushed and fsynced), so a kill leaves at most a torn last
line, which the next run cuts off before skipping the ids already answered. Questions about the same
image run together, so each distinct image is encoded once per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from assistant.chat.engine import ChatEngine, Conversation, Sampling
from assistant import store
from assistant.commands import common
from assistant.images import ImageError, load_image
from models.errors import LvaError


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "batch", help="answer every question of a JSONL file into another JSONL file",
        description='Input lines: {"id", "prompt", "image"?, "system"?, "max_tokens"?, "temperature"?, "seed"?}. '
                    'Output lines: {"id", "response", "prompt_tokens", "completion_tokens", "seconds", "done_reason" '
                    '("stop", or "length" when cut at max_tokens), "error"?}. '
                    "Rerunning with the same --out skips the ids already done. "
                    "Example: lva batch questions.jsonl --out answers.jsonl")
    parser.add_argument("input", type=Path, help="questions, one JSON object per line")
    parser.add_argument("--out", type=Path, required=True, help="answers, appended one JSON object per line")
    common.add_model_options(parser)
    common.add_parallel_option(parser, "questions answered together")
    parser.set_defaults(run=run)


@dataclass
class Question:
    line: int
    id: Any
    fields: dict
    error: str | None = None


def read_questions(path: Path) -> list[Question]:
    """Every line, good or bad: a bad one becomes a question whose answer is its error."""
    questions = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                questions.append(Question(number, f"line-{number}", {}, f"line {number} is not JSON ({exc.msg})"))
                continue
            if not isinstance(fields, dict) or "id" not in fields or not isinstance(fields.get("prompt"), str):
                ident = fields.get("id", f"line-{number}") if isinstance(fields, dict) else f"line-{number}"
                questions.append(Question(number, ident, {}, f"line {number} needs an \"id\" and a string \"prompt\""))
                continue
            questions.append(Question(number, fields["id"], fields))
    return questions


def done_ids(out: Path) -> set:
    """Ids already answered in OUT; a torn last line (from a kill) is cut off first."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with out.open("r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    return {json.loads(line)["id"] for line in complete.decode("utf-8").splitlines() if line.strip()}


def append_record(out, record: dict) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    os.fsync(out.fileno())


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from assistant.runtime.parallel import ParallelDecoder

    questions = read_questions(args.input)
    done = done_ids(args.out)
    todo = [q for q in questions if q.id not in done]
    by_image: dict[str | None, list[Question]] = {}
    for q in todo:
        by_image.setdefault(q.fields.get("image"), []).append(q)
    text = store.resolve_model(args.model)
    parallel = common.parallel_from(args, text)
    model = common.load(args, text)
    decoder = ParallelDecoder(model, parallel, args.ctx)
    engine = ChatEngine(model, decoder=decoder)
    stopping, written = threading.Event(), threading.Lock()
    scheduler = threading.Thread(target=decoder.run, args=(stopping,), name="lva-decoder", daemon=True)
    scheduler.start()
    base = common.sampling_from(args)
    try:
        with args.out.open("a", encoding="utf-8") as out, tqdm(total=len(todo), unit="q", file=sys.stderr) as bar, \
                ThreadPoolExecutor(parallel) as pool:

            def finish(q: Question, image_path: Path | None, error: str | None) -> None:
                record = {"id": q.id}
                if error is None:
                    try:
                        record.update(answer(engine, q, image_path, base))
                    except LvaError as exc:
                        error = str(exc)
                if error is not None:
                    record.update(response=None, prompt_tokens=0, completion_tokens=0, seconds=0.0, done_reason=None,
                                  error=error)
                with written:
                    append_record(out, record)
                    bar.update(1)

            running = []
            for image, group in by_image.items():     # an image's questions together: it is encoded once
                image_path = Path(image).expanduser() if image else None
                image_error = None
                if image_path is not None:
                    try:
                        load_image(image_path)
                    except ImageError as exc:
                        image_error = str(exc)
                running += [pool.submit(finish, q, image_path, q.error or image_error) for q in group]
            for future in running:
                future.result()                        # a bug in a question's thread ends the run here
        if args.verbose:
            print(f"lva: {model.images_encoded} images encoded", file=sys.stderr)
    finally:
        stopping.set()
        decoder.wake()
        scheduler.join()
        decoder.close()
        model.close()
    return 0


def answer(engine: ChatEngine, question: Question, image: Path | None, base: Sampling) -> dict:
    fields = question.fields
    sampling = replace(base, **{k: fields[k] for k in ("max_tokens", "temperature", "seed") if k in fields})
    conversation = Conversation(system_prompt=fields.get("system"), sampling=sampling)
    replies: list = []
    start = time.perf_counter()
    text = "".join(engine.send(conversation, fields["prompt"], image, on_reply=replies.append))
    reply = replies[-1]
    return {"response": text, "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "seconds": round(time.perf_counter() - start, 3), "done_reason": reply.done_reason}
