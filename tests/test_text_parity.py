"""The converted text file, run by stock llama-cpp-python, matches the reference on text-only prompts.

Reference: HF transformers with Meta's semantics, float32, on the committed tiny checkpoints
(tests/fixtures/). Without an image mllama skips its cross-attention layers, so the text file alone
must give the reference's logits: within 2e-3 and with the same argmax at every position.
"""

from __future__ import annotations

import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from convert.pipeline import convert

FIXTURES = Path(__file__).parent / "fixtures" / "mllama"
CONFIGS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").is_file())
TOLERANCE = 2e-3


def test_the_golden_fixtures_are_there() -> None:
    assert len(CONFIGS) >= 3, f"expected the committed fixtures in {FIXTURES}"


@pytest.fixture(scope="module", params=CONFIGS)
def fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = FIXTURES / request.param
    reference = json.loads((directory / "reference.json").read_text())
    pair = convert(str(directory / reference["checkpoint"]), tmp_path_factory.mktemp(request.param), quant="F32",
                   progress=False)
    # llama.cpp keeps K/V in F16 by default; an F32 parity run keeps them in F32 too.
    model = llama_cpp.Llama(str(pair.text), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    with np.load(directory / "reference.npz") as arrays:
        logits = {key.split("/", 1)[1]: arrays[key] for key in arrays.files if key.startswith("logits/")}
    return reference, model, logits


def text_cases(reference: dict) -> list[dict]:
    cases = [case for case in reference["cases"] if case["image"] is None]
    assert len(cases) >= 3
    return cases


def test_llama_cpp_tokenizes_like_the_hf_tokenizer(fixture) -> None:
    reference, model, _ = fixture
    for case in reference["cases"]:
        prompt = case["prompt"]
        if case["image"] is not None:       # <|image|> is not in the text vocabulary; compare around it
            before, after = prompt.split("<|image|>")
            ids = (model.tokenize(before.encode(), add_bos=case["add_bos"], special=True) + [reference["image_token_id"]]
                   + model.tokenize(after.encode(), add_bos=False, special=True))
        else:
            ids = model.tokenize(prompt.encode(), add_bos=case["add_bos"], special=True)
        assert ids == case["token_ids"], case["name"]


def test_text_only_logits_match_the_reference_at_every_position(fixture) -> None:
    reference, model, expected_logits = fixture
    for case in text_cases(reference):
        model.reset()
        model.eval(case["token_ids"])
        logits = np.asarray(model.scores[: len(case["token_ids"])])
        expected = expected_logits[case["name"]]
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() < TOLERANCE, case["name"]
        assert (logits.argmax(axis=1) == expected.argmax(axis=1)).all(), case["name"]
