"""Builds the native kernels (models/kernels/*.c) from source on install; everything else is in pyproject.toml.

The kernels are plain shared libraries loaded with ctypes, not Python extension modules; setuptools'
build step is only the portable way to run the C compiler on install. `optional=True`: a machine without a
working compiler still installs lva, which then says so once and uses ggml's own kernels.
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("models.kernels._cpu", ["models/kernels/cpu.c"], optional=True,
              extra_compile_args=["-O3", "-std=c11"]),
])
