"""What the kernel tests share: every path lva's kernels have, and running one only where the CPU can."""

from __future__ import annotations

import pytest

from dataclasses import replace

from models.kernels import library
from models.kernels.paths import Arithmetic, Isa, KernelPath, Paths

ATTENTION = [KernelPath.parse(p) for p in ("f32@reference", "f32@avx2", "f32@avx512", "int16@avx2", "int16@avx512",
                                     "bf16@avx512_bf16")]
PRODUCTS = [KernelPath.parse(p) for p in ("f32@reference", "f32@avx2", "f32@avx512", "int16@reference", "int16@avx2",
                                    "int16@avx512", "int8@reference", "int8@avx512")]
F32 = [KernelPath.parse(p) for p in ("f32@reference", "f32@avx2", "f32@avx512")]        # the GELU, the cross-attention


def require(path: KernelPath, op: str) -> None:
    """Skip, naming the path, where this CPU cannot run it; the session's summary lists those (conftest.py)."""
    if not library.runs(path, op):
        pytest.skip(f"this CPU cannot run {path} (not run)")


def widest(arithmetic: Arithmetic, op: str) -> KernelPath | None:
    """The widest instruction set this CPU runs `arithmetic` on for `op`, or None."""
    for isa in reversed(library.isas()):
        if isa is Isa.AVX512_BF16 and arithmetic is not Arithmetic.BF16:
            continue                                   # AVX-512's code, under another name
        if library.runs(KernelPath(arithmetic, isa), op):
            return KernelPath(arithmetic, isa)
    return None


def f32_paths(**others: KernelPath) -> Paths:
    """Our kernels in F32 for every op (the closest to exact), on the widest instruction set, or as given;
    skips the test where this CPU runs none of them."""
    chosen = {op: widest(Arithmetic.F32, op) for op in ("attention", "products", "mlp_down", "gelu", "cross_attention")}
    chosen.update(others)
    if None in chosen.values():
        pytest.skip("this CPU runs none of lva's SIMD kernels (not run)")
    for op, path in chosen.items():
        require(path, op)
    return Paths(**chosen)


def without_int8(threads: int = 2) -> Paths:
    """This CPU's chosen paths with the MLP's down product in the other products' arithmetic: for tests that
    bound what a file's quantization costs, not what int8 costs (on the tests' narrow random models int8 adds
    about as much as Q8_0 weights; at the real widths it stays within HF bf16's error, docs/PERFORMANCE.md)."""
    from assistant.runtime import kernel_choice

    chosen = kernel_choice.choose(threads)
    return replace(chosen, mlp_down=chosen.products)
