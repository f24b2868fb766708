"""Our fused attention kernel (models/kernels/cpu.c) against ggml's exact F32 softmax attention.

Random inputs at the encoder's shapes (16 heads of 80, 1601 to 6432 tokens, both calls of the real-first
order), odd token counts and the tiny configs' head dims, on 1, 2 and 3 threads. Each path has its own
bound, measured on the development machine (AMD EPYC with AVX-512 BF16, 2026-11-29) with q, k, v ~ N(0, 1)
("standard": scores of std 1) and with q three times larger ("peaked": scores of std 3, nearly one-hot
rows), as max |out - exact| for outputs of std ~1:

| path | what it rounds | standard | peaked |
|---|---|--:|--:|
| reference | nothing (F32, row by row) | 6.1e-7 | 3.0e-5 |
| avx2 | Q, K, V to 13-bit and P to 12-bit integers, with F32 scales | 1.07e-3 | 4.4e-3 |
| avx512bf16 | Q, K, V and P to BF16 | 7.4e-3 | 3.8e-2 |

The bounds are 1.5x that. (The avx2 path kept K and V in F16 before it multiplied integers: 7.3e-4 and
3.6e-3; its largest errors now come from the tiny head dims, 8.3e-4 at most on the encoder's.) A path this CPU cannot run is reported as a skip naming it, and the session's
summary lists the paths that ran (tests/conftest.py).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import pytest

from assistant import ModelError, load_model
from convert.pipeline import convert
from models import ggml
from models.ggml import F32, Graph
from models.kernels import cpu as kernels
from models.mllama import vision

FIXTURES = Path(__file__).parent / "fixtures"
SHAPES = [  # (tokens, real tokens, heads, head dim)
    (6432, 6404, 16, 80),                  # a 4-tile image
    (6432, 1601, 16, 80),                  # a 1-tile image: most queries are padding
    (2411, 2399, 16, 80),                  # odd counts, no whole key block
    (1601, 1601, 16, 80),                  # every token real: one call
    (37, 30, 3, 16), (301, 299, 2, 20), (700, 1, 4, 8),   # the tiny configs' head dims
]
BOUNDS = {("reference", "standard"): 1e-6, ("reference", "peaked"): 4.5e-5,
          ("avx2", "standard"): 1.6e-3, ("avx2", "peaked"): 6.7e-3,
          ("avx512bf16", "standard"): 1.1e-2, ("avx512bf16", "peaked"): 5.6e-2}
THREADS = (1, 2, 3)
# The scalar reference path is slow: a yardstick, run on the shapes up to 2411 tokens only.
CASES = [(path, shape) for path in sorted(kernels.PATHS) for shape in SHAPES if path != "reference" or shape[0] < 2500]


def run_attention(mode: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, real: int,
                  threads: int) -> np.ndarray:
    backend = ggml.Backend(threads)
    scratch, g = ggml.Scratch(backend), Graph()
    try:
        inputs = [g.input(F32, x.shape[1], x.shape[0], name=name) for name, x in zip("qkv", (q, k, v))]
        out = g.output(vision.attend(g, *inputs, heads, real, mode))
        scratch.run(g, dict(zip(inputs, (q, k, v))))
        return ggml.tensor_get(out)
    finally:
        g.close()
        scratch.close()
        backend.close()


@functools.cache
def problem(shape: tuple[int, int, int, int], scores: str) -> tuple[np.ndarray, ...]:
    """Inputs and ggml's exact answer (F32 products, ggml's softmax), computed once per shape."""
    tokens, real, heads, head_dim = shape
    rng = np.random.default_rng(tokens + real)
    q, k, v = (rng.standard_normal((tokens, heads * head_dim), dtype=np.float32) for _ in range(3))
    q *= 3.0 if scores == "peaked" else 1.0
    return q, k, v, run_attention("softmax", q, k, v, heads, real, 2)


def test_the_library_sees_what_the_cpu_has() -> None:
    paths = kernels.runnable_paths()
    assert "reference" in paths, "the kernel library was not built or not found"
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":")[1].split())
        assert ("avx2" in paths) == ({"avx2", "fma", "f16c"} <= flags)
        assert ("avx512bf16" in paths) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags)


@pytest.mark.slow
@pytest.mark.parametrize("scores", ["standard", "peaked"])
@pytest.mark.parametrize("path, shape", CASES, ids=[f"{p}-{'x'.join(map(str, s))}" for p, s in CASES])
def test_each_path_stays_within_its_bound_of_exact_attention(path: str, shape: tuple, scores: str) -> None:
    if path not in kernels.runnable_paths():
        pytest.skip(f"this CPU cannot run the {path} path (not run)")
    q, k, v, exact = problem(shape, scores)
    _, real, heads, _ = shape
    results = [run_attention(path, q, k, v, heads, real, threads) for threads in THREADS]
    error = np.abs(results[0] - exact).max()
    assert error < BOUNDS[path, scores], f"{path}: {error:.3g}"
    for other in results[1:]:                 # the work split never changes a result
        assert np.array_equal(other, results[0])


def test_lva_attention_chooses_the_path(tiny_f16_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    for wanted, expected in (("ggml", "flash"), ("reference", "reference"), ("", kernels.chosen_path({}) or "flash")):
        monkeypatch.setenv(kernels.ENVIRONMENT, wanted)
        model = load_model(tiny_f16_pair.text, n_ctx=256)
        try:
            assert model.vision.tower.attention == expected
        finally:
            model.close()


def test_an_unknown_lva_attention_is_a_one_line_error(tiny_f16_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENVIRONMENT, "fastest")
    with pytest.raises(ModelError) as caught:
        load_model(tiny_f16_pair.text, n_ctx=256)
    assert "LVA_ATTENTION=fastest" in str(caught.value) and "\n" not in str(caught.value)


def test_without_the_library_the_encoder_says_so_once_and_keeps_ggml(tiny_f16_pair, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kernels, "LIBRARY", "models.kernels._not_built")      # as after a failed build
    monkeypatch.delenv(kernels.ENVIRONMENT, raising=False)
    for cached in (kernels._library, kernels._warn_once):
        cached.cache_clear()
    try:
        for _ in range(2):
            model = load_model(tiny_f16_pair.text, n_ctx=256)
            try:
                assert model.vision.tower.attention == "flash"
                ids = model.tokenize("<|begin_of_text|><|image|>hi")
                assert np.isfinite(model.logits(ids, FIXTURES / "images" / "rgb_173x97.png")).all()
            finally:
                model.close()
    finally:
        for cached in (kernels._library, kernels._warn_once):
            cached.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if "CPU kernels are missing" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "not built" in warnings[0]


def test_an_f32_tower_keeps_the_exact_softmax(tmp_path: Path) -> None:
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path, quant="F32", progress=False)
    model = load_model(pair.text, n_ctx=256)
    try:
        assert model.vision.tower.attention == "softmax"
    finally:
        model.close()


@pytest.fixture(scope="module")
def tiny_f16_pair(tmp_path_factory: pytest.TempPathFactory):
    return convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("f16"), quant="F32",
                   vision_quant="F16", progress=False)
