"""Builds the native kernels (models/kernels/*.c) from source on install; everything else is in pyproject.toml.

The kernels are one plain shared library loaded with ctypes, not a Python extension module; setuptools'
build step is only the portable way to run the C compiler on install. `optional=True`: a machine without a
working compiler still installs lva, which then says so once and uses ggml's own kernels.
`LVA_KERNEL_CFLAGS` adds flags (CI builds once more with `-Werror`).
"""

import os

from setuptools import Extension, setup

KERNELS = ["common", "attention", "cross_attention", "gelu", "products", "isa_avx2", "isa_avx512"]
WARNINGS = ["-Wall", "-Wextra", "-Wshadow", "-Wmissing-prototypes"]

setup(ext_modules=[
    Extension("models.kernels._cpu", [f"models/kernels/{name}.c" for name in KERNELS], optional=True,
              depends=[f"models/kernels/{header}" for header in ("lva.h", "simd.h", "simd_sections.h", "tile.h")],
              extra_compile_args=["-O3", "-std=c11", *WARNINGS, *os.environ.get("LVA_KERNEL_CFLAGS", "").split()]),
])
