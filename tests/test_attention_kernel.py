"""Our fused attention kernel (models/kernels/attention.c) against ggml's exact F32 softmax attention.

Random inputs at the encoder's shapes (16 heads of 80, 1601 to 6432 tokens, both calls of the real-first
order), odd token counts and the tiny configs' head dims, on 1, 2 and 3 threads. Each path has its own
bound, measured on the development machine (AMD EPYC with AVX-512 BF16, 2026-11-29) with q, k, v ~ N(0, 1)
("standard": scores of std 1) and with q three times larger ("peaked": scores of std 3, nearly one-hot
rows), as max |out - exact| for outputs of std ~1:

| arithmetic | what it rounds | standard | peaked |
|---|---|--:|--:|
| f32 | nothing (the reference: F32, row by row; the SIMD paths: flash attention in F32) | 6.1e-7 | 3.0e-5 |
| int16 | Q, K, V to 13-bit and P to 12-bit integers, with F32 scales | 1.07e-3 | 4.4e-3 |
| bf16 | Q, K, V and P to BF16 | 7.4e-3 | 3.8e-2 |

The bounds are 1.5x that; every instruction set of an arithmetic keeps its bound. (The int16 path's largest
errors come from the tiny head dims, 8.3e-4 at most on the encoder's.) A path this CPU cannot run is
reported as a skip naming it, and the session's summary lists the instruction sets that ran
(tests/conftest.py).
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
from models.kernels import library
from models.kernels.paths import GGML_EXACT_ATTENTION, GGML_FLASH_ATTENTION, Arithmetic, Isa, KernelPath
from models.mllama import vision
from tests.kernel_paths import ATTENTION, require

FIXTURES = Path(__file__).parent / "fixtures"
SHAPES = [  # (tokens, real tokens, heads, head dim)
    (6432, 6404, 16, 80),                  # a 4-tile image
    (6432, 1601, 16, 80),                  # a 1-tile image: most queries are padding
    (2411, 2399, 16, 80),                  # odd counts, no whole key block
    (1601, 1601, 16, 80),                  # every token real: one call
    (37, 30, 3, 16), (301, 299, 2, 20), (700, 1, 4, 8),   # the tiny configs' head dims
]
BOUNDS = {(Arithmetic.F32, "standard"): 1e-6, (Arithmetic.F32, "peaked"): 4.5e-5,
          (Arithmetic.INT16, "standard"): 1.6e-3, (Arithmetic.INT16, "peaked"): 6.7e-3,
          (Arithmetic.BF16, "standard"): 1.1e-2, (Arithmetic.BF16, "peaked"): 5.6e-2}
THREADS = (2, 1, 3)          # the work split never changes a result: checked on the shapes up to 2411 tokens
# The scalar reference path is slow: a yardstick, run on the shapes up to 2411 tokens only.
CASES = [(path, shape) for path in ATTENTION for shape in SHAPES if path.isa is not Isa.REFERENCE or shape[0] < 2500]


def run_attention(path: KernelPath, q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, real: int,
                  threads: int) -> np.ndarray:
    backend = ggml.Backend(threads)
    scratch, g = ggml.Scratch(backend), Graph()
    try:
        inputs = [g.input(F32, x.shape[1], x.shape[0], name=name) for name, x in zip("qkv", (q, k, v))]
        out = g.output(vision.attend(g, *inputs, heads, real, path))
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
    return q, k, v, run_attention(GGML_EXACT_ATTENTION, q, k, v, heads, real, 2)


def test_the_library_sees_what_the_cpu_has() -> None:
    isas = library.isas()
    assert Isa.REFERENCE in isas, "the kernel library was not built or not found"
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":")[1].split())
        avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= flags
        assert (Isa.AVX2 in isas) == ({"avx2", "fma", "f16c"} <= flags)
        assert (Isa.AVX512 in isas) == avx512
        assert (Isa.AVX512_BF16 in isas) == (avx512 and "avx512_bf16" in flags)


@pytest.mark.slow
@pytest.mark.parametrize("scores", ["standard", "peaked"])
@pytest.mark.parametrize("path, shape", CASES, ids=[f"{p}-{'x'.join(map(str, s))}" for p, s in CASES])
def test_each_path_stays_within_its_bound_of_exact_attention(path: KernelPath, shape: tuple, scores: str) -> None:
    require(path, "attention")
    q, k, v, exact = problem(shape, scores)
    _, real, heads, _ = shape
    results = [run_attention(path, q, k, v, heads, real, threads) for threads in THREADS[:1 if shape[0] > 2500 else 3]]
    error = np.abs(results[0] - exact).max()
    assert error < BOUNDS[path.arithmetic, scores], f"{path}: {error:.3g}"
    for other in results[1:]:                 # the work split never changes a result
        assert np.array_equal(other, results[0])


def test_lva_attention_forces_the_path(tiny_f16_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    for wanted, expected in (("ggml", GGML_FLASH_ATTENTION), ("reference", KernelPath(Arithmetic.F32, Isa.REFERENCE)),
                             ("f32@avx2", KernelPath(Arithmetic.F32, Isa.AVX2))):
        if not library.runs(expected, "attention"):
            continue
        monkeypatch.setenv("LVA_ATTENTION", wanted)
        model = load_model(tiny_f16_pair.text, n_ctx=256)
        try:
            assert model.vision.tower.paths.attention == expected
        finally:
            model.close()
    monkeypatch.setenv("LVA_ATTENTION", "f32")             # an arithmetic alone: its fastest instruction set
    model = load_model(tiny_f16_pair.text, n_ctx=256)
    try:
        chosen = model.vision.tower.paths.attention
        assert chosen.arithmetic is Arithmetic.F32 and chosen.isa not in (None, Isa.REFERENCE)
    finally:
        model.close()


def test_an_unknown_lva_attention_is_a_one_line_error(tiny_f16_pair, monkeypatch: pytest.MonkeyPatch) -> None:
    for wanted in ("fastest", "int16@avx9"):
        monkeypatch.setenv("LVA_ATTENTION", wanted)
        with pytest.raises(ModelError) as caught:
            load_model(tiny_f16_pair.text, n_ctx=256)
        assert f"LVA_ATTENTION={wanted}" in str(caught.value) and "\n" not in str(caught.value)


def test_without_the_library_the_encoder_says_so_once_and_keeps_ggml(tiny_f16_pair, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    from assistant.runtime import kernel_choice
    monkeypatch.setattr(library, "LIBRARY", "models.kernels._not_built")      # as after a failed build
    monkeypatch.delenv("LVA_ATTENTION", raising=False)
    for cached in (library.load, kernel_choice._warn_missing_library):
        cached.cache_clear()
    try:
        for _ in range(2):
            model = load_model(tiny_f16_pair.text, n_ctx=256)
            try:
                assert model.vision.tower.paths.attention == GGML_FLASH_ATTENTION
                ids = model.tokenize("<|begin_of_text|><|image|>hi")
                assert np.isfinite(model.logits(ids, FIXTURES / "images" / "rgb_173x97.png")).all()
            finally:
                model.close()
    finally:
        for cached in (library.load, kernel_choice._warn_missing_library):
            cached.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if "CPU kernels are missing" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "not built" in warnings[0]


def test_an_f32_tower_keeps_the_exact_softmax(tmp_path: Path) -> None:
    pair = convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path, quant="F32", progress=False)
    model = load_model(pair.text, n_ctx=256)
    try:
        assert model.vision.tower.paths.attention == GGML_EXACT_ATTENTION
    finally:
        model.close()


@pytest.fixture(scope="module")
def tiny_f16_pair(tmp_path_factory: pytest.TempPathFactory):
    return convert(str(FIXTURES / "mllama" / "tiny-a" / "checkpoint"), tmp_path_factory.mktemp("f16"), quant="F32",
                   vision_quant="F16", progress=False)
