"""The runtime matches the reference (HF transformers with Meta's semantics) on the golden fixtures.

Every config, every case: logits at every position within 2e-3 with the same argmax, image or not;
preprocessing within 1e-4 of the reference pixels; 32 greedy tokens equal to the reference's.
F32 files with the default settings, as DESIGN's contract promises (an F32 text file gets an F32 KV cache),
so the only differences left are summation order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from assistant import load_model
from convert.pipeline import convert

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = sorted(p.name for p in (FIXTURES / "mllama").iterdir() if (p / "reference.json").is_file())
LOGITS_TOLERANCE = 2e-3
PIXELS_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=CONFIGS)
def runtime(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = FIXTURES / "mllama" / request.param
    reference = json.loads((directory / "reference.json").read_text())
    pair = convert(str(directory / reference["checkpoint"]), tmp_path_factory.mktemp(request.param), quant="F32",
                   progress=False)
    model = load_model(pair.text, n_ctx=512)
    with np.load(directory / "reference.npz") as arrays:
        expected = {key: arrays[key] for key in arrays.files}
    yield reference, model, expected
    model.close()


def image_path(case: dict) -> Path | None:
    return None if case["image"] is None else FIXTURES / "images" / case["image"]


def test_the_fixtures_cover_what_the_acceptance_asks() -> None:
    reference = json.loads((FIXTURES / "mllama" / "tiny-a" / "reference.json").read_text())
    images = reference["images"].values()
    assert {image["num_tiles"] for image in images} == {1, 2, 3, 4}
    assert {tuple(image["tiles"]) for image in images} >= {(1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1)}
    assert {image["mode"] for image in images} >= {"RGB", "RGBA", "L", "P"}
    names = {case["name"].split(".")[0] for case in reference["cases"]}
    assert names >= {"text_plain", "image_first", "text_before_image"}


def test_tokenize_parses_specials_and_the_image_token_like_hf(runtime) -> None:
    reference, model, _ = runtime
    assert model.image_token_id == reference["image_token_id"]
    for case in reference["cases"]:
        assert model.tokenize(case["prompt"], add_bos=case["add_bos"]) == case["token_ids"], case["name"]


def test_logits_match_the_reference_at_every_position(runtime) -> None:
    reference, model, expected = runtime
    for case in reference["cases"]:
        logits = model.logits(case["token_ids"], image_path(case))
        want = expected[f"logits/{case['name']}"]
        assert logits.shape == want.shape
        assert np.abs(logits - want).max() < LOGITS_TOLERANCE, case["name"]
        assert (logits.argmax(axis=1) == want.argmax(axis=1)).all(), case["name"]


def test_the_image_changes_the_logits_after_its_token_only(runtime) -> None:
    reference, model, _ = runtime
    case = next(c for c in reference["cases"] if c["name"].startswith("text_before_image"))
    other = next(name for name in reference["images"] if name != case["image"])
    first = model.logits(case["token_ids"], image_path(case))
    second = model.logits(case["token_ids"], FIXTURES / "images" / other)
    start = case["image_token_pos"]
    assert np.array_equal(first[:start], second[:start])
    assert np.abs(first[start:] - second[start:]).max() > 1e-2


def test_preprocess_matches_the_reference_pixels(runtime) -> None:
    reference, model, expected = runtime
    for name, facts in reference["images"].items():
        image = model.preprocess(FIXTURES / "images" / name)
        assert image.aspect_ratio_id == facts["aspect_ratio_id"], name
        assert image.num_tiles == facts["num_tiles"], name
        assert np.abs(image.pixels - expected[f"pixels/{name}"]).max() < PIXELS_TOLERANCE, name


def test_greedy_generation_matches_the_reference(runtime) -> None:
    reference, model, expected = runtime
    for case in reference["cases"]:
        tokens = list(model.generate_tokens(case["token_ids"], image_path(case), max_tokens=reference["num_greedy"],
                                            temperature=0.0, stop_at_end_of_turn=False))
        assert tokens == expected[f"greedy/{case['name']}"].tolist(), case["name"]
