"""Encoded images kept on disk: reused across processes, capped, safe to share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from assistant.chat.feature_cache import FeatureCache
from convert.pipeline import convert
from tests.conftest import REPO_ROOT, run_lva

FIXTURES = Path(__file__).parent / "fixtures"


def arrays(seed: int, size: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"k.3": rng.standard_normal(size).astype(np.float16), "v.3": rng.standard_normal(size).astype(np.float16)}


def test_an_entry_comes_back_as_it_was_stored(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.store("abc:pair", arrays(1))
    loaded = cache.load("abc:pair")
    assert loaded is not None and all(np.array_equal(loaded[k], v) for k, v in arrays(1).items())
    assert cache.load("other:pair") is None


def test_the_least_recently_used_entries_go_past_the_cap(tmp_path: Path) -> None:
    one_entry = 2 * 1000 * 2
    cache = FeatureCache(tmp_path, cap_bytes=int(2.5 * one_entry) + 2000)
    for key in ("a", "b"):
        cache.store(key, arrays(0))
    assert cache.load("a") is not None                      # a is now more recent than b
    cache.store("c", arrays(0))
    assert cache.load("b") is None and cache.load("a") is not None and cache.load("c") is not None


def test_a_damaged_entry_is_a_miss_not_an_error(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.store("x", arrays(2))
    path = next(tmp_path.glob("*.npz"))
    path.write_bytes(path.read_bytes()[:100])
    assert cache.load("x") is None


def test_two_processes_writing_the_same_entries_leave_only_whole_ones(tmp_path: Path) -> None:
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np\n"
              "from assistant.chat.feature_cache import FeatureCache\n"
              "c = FeatureCache(__import__('pathlib').Path(sys.argv[2]))\n"
              "for i in range(30): c.store(f'key{i % 3}', {'k.0': np.full(200000, i % 3, np.float32)})\n")
    children = [subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT), str(tmp_path)]) for _ in range(2)]
    assert all(child.wait(timeout=120) == 0 for child in children)
    cache = FeatureCache(tmp_path)
    for i in range(3):
        entry = cache.load(f"key{i}")
        assert entry is not None and entry["k.0"].shape == (200000,) and (entry["k.0"] == i).all()
    assert not list(tmp_path.glob("*.part"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("models"),
                   quant="F32", name="tiny-a", progress=False)
    return str(pair.text)


def test_reopening_a_conversation_with_its_image_does_not_run_the_encoder_again(model_path: str) -> None:
    common = ("--model", model_path, "--max-tokens", "4", "--verbose")
    first = run_lva("ask", *common, "--image", str(FIXTURES / "images" / "rgb_173x97.png"), "Describe it.")
    assert first.returncode == 0 and "vision encoder runs: 1" in first.stderr, first.stderr
    again = run_lva("ask", *common, "--continue", "And then?")
    assert again.returncode == 0 and "vision encoder runs: 0" in again.stderr, again.stderr
