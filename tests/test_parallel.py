"""Several answers decoded together (assistant/runtime/parallel.py) give what each gives alone.

On the F32 fixtures, exact: greedy answers token for token, and a batched step's logits within 1e-4 of the
solo step's. Around them: sequences with and without an image in one step, one finishing while others go
on, a cancelled one, a failing one beside good ones, and KV cells freed and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from assistant import load_model
from assistant.runtime.errors import ModelError
from assistant.runtime.sampling import SamplingParams
from assistant.runtime.parallel import AnswerHandle, ParallelDecoder, Request
from convert.pipeline import convert
from models.errors import LvaError

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory: pytest.TempPathFactory):
    directory = FIXTURES / "mllama" / "tiny-a"
    reference = json.loads((directory / "reference.json").read_text())
    pair = convert(str(directory / "checkpoint"), tmp_path_factory.mktemp("tiny-a"), quant="F32", progress=False)
    model = load_model(pair.text, n_ctx=256)
    yield model, reference
    model.close()


def cases(reference: dict, count: int, with_text_only: bool = True) -> list[dict]:
    """`count` reference cases: images of different sizes (tile counts), and a text-only one."""
    with_image = [c for c in reference["cases"] if c["image"] is not None]
    chosen = [with_image[i * len(with_image) // count] for i in range(count - 1)]
    text_only = next(c for c in reference["cases"] if c["image"] is None)
    return chosen + [text_only if with_text_only else with_image[-1]]


def request(case: dict, max_tokens: int = 12) -> Request:
    image = IMAGES / case["image"] if case["image"] else None
    return Request(case["token_ids"], image, GREEDY, max_tokens=max_tokens, stop_at_end_of_turn=False)


def run(decoder: ParallelDecoder) -> None:
    while decoder.step():
        pass


def tokens_of(answer: AnswerHandle) -> list[int]:
    return list(answer.tokens())


def test_answers_decoded_together_are_the_answers_decoded_alone(tiny_a) -> None:
    model, reference = tiny_a
    chosen = cases(reference, 4)
    alone = [list(model.generate_tokens(c["token_ids"], request(c).image, max_tokens=12, temperature=0.0,
                                        stop_at_end_of_turn=False)) for c in chosen]
    decoder = ParallelDecoder(model, 4, 256)
    try:
        answers = [decoder.submit(request(c)) for c in chosen]
        run(decoder)
        assert [tokens_of(a) for a in answers] == alone
        assert all(a.done_reason == "length" for a in answers)
    finally:
        decoder.close()


def test_a_batched_step_gives_the_solo_logits(tiny_a) -> None:
    """Two sequences with their own images and one without, their prompts in one llama_decode: each row's
    logits as the sequence alone gives them (measured: 3e-6 for logits of std ~4)."""
    model, reference = tiny_a
    chosen = cases(reference, 3)
    solo = [model.logits(c["token_ids"], request(c).image)[-1] for c in chosen]
    ctx = model.new_context(3 * 256, sequences=3)
    try:
        for sequence, case in enumerate(chosen):
            if case["image"]:
                _, kv = model.encode_image(IMAGES / case["image"])
                model.bind_image(sequence, kv, case["token_ids"].index(model.image_token_id))
        rows = model.evaluate(ctx, [(s, 0, c["token_ids"], True) for s, c in enumerate(chosen)])
        for sequence, index in enumerate(rows):
            assert np.abs(model.row_logits(ctx, index) - solo[sequence]).max() < 1e-4
    finally:
        for sequence in range(3):
            model.bind_image(sequence, None)
        llama_cpp.llama_free(ctx)


def test_a_sequence_that_finishes_leaves_the_others_going(tiny_a) -> None:
    model, reference = tiny_a
    short, long = cases(reference, 2, with_text_only=False)
    decoder = ParallelDecoder(model, 2, 256)
    try:
        first, second = decoder.submit(request(short, max_tokens=2)), decoder.submit(request(long, max_tokens=10))
        run(decoder)
        assert len(tokens_of(first)) == 2 and len(tokens_of(second)) == 10
        alone = list(model.generate_tokens(long["token_ids"], IMAGES / long["image"], max_tokens=10, temperature=0.0,
                                           stop_at_end_of_turn=False))
        assert tokens_of_again(decoder, long) == alone
    finally:
        decoder.close()


def tokens_of_again(decoder: ParallelDecoder, case: dict) -> list[int]:
    answer = decoder.submit(request(case, max_tokens=10))
    run(decoder)
    return tokens_of(answer)


def test_a_cancelled_answer_frees_its_slot_at_the_next_step(tiny_a) -> None:
    model, reference = tiny_a
    one, other = cases(reference, 2)
    decoder = ParallelDecoder(model, 1, 256)
    try:
        leaving = decoder.submit(request(one, max_tokens=50))
        waiting = decoder.submit(request(other, max_tokens=3))
        while leaving.events.qsize() < 2:            # two tokens out, then the client hangs up
            decoder.step()
        leaving.cancel()
        run(decoder)
        assert len(tokens_of(leaving)) >= 2 and leaving.done_reason == "stopped"
        assert len(tokens_of(waiting)) == 3
    finally:
        decoder.close()


def test_a_failing_request_fails_alone(tiny_a, tmp_path: Path) -> None:
    model, reference = tiny_a
    good = cases(reference, 3)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    decoder = ParallelDecoder(model, 4, 256)
    try:
        answers = [decoder.submit(request(c)) for c in good]
        failing = decoder.submit(Request(good[0]["token_ids"], broken, GREEDY, max_tokens=4))
        too_long = decoder.submit(Request([1] * 300, None, GREEDY, max_tokens=4))
        run(decoder)
        with pytest.raises(LvaError, match="not an image"):
            tokens_of(failing)
        with pytest.raises(ModelError, match="300 tokens"):
            tokens_of(too_long)
        assert all(len(tokens_of(a)) == 12 for a in answers)
    finally:
        decoder.close()


def test_kv_cells_are_freed_and_reused(tiny_a) -> None:
    """Eight answers of about 100 tokens each through two slots of 256: more than the context's 512 cells
    in all, so they fit only if each slot's cells are taken back for the next answer."""
    model, reference = tiny_a
    chosen = cases(reference, 4) * 2
    decoder = ParallelDecoder(model, 2, 256)
    try:
        answers = [decoder.submit(request(c, max_tokens=40)) for c in chosen]
        run(decoder)
        assert all(len(tokens_of(a)) == 40 for a in answers)
        assert all(-1 <= position < 256 for position in decoder.held_positions())
    finally:
        decoder.close()
