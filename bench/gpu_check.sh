#!/usr/bin/env bash
# GPU check, in one go on a machine with an NVIDIA GPU: build llama-cpp-python with CUDA into .venv-cuda,
# show that the build took (`lva info`), run the parity tests on the GPU, then bench/runtime_bench.py
# (--quick: a shallow vision tower, to fit the time) and bench/device_bench.py --on gpu.
# Everything it prints also goes to $OUT/gpu_check.log (OUT defaults to bench/out/gpu-check).
#
# Needs: nvidia-smi, the CUDA toolkit (nvcc), CMake, a C++ compiler, Python 3.11+, and PyPI, or wheels
# and the llama-cpp-python sdist in a folder (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR; pip reads both).
# Time on 16 cores: the CUDA build for this card's architecture only is the long part (about 5 minutes);
# tests about 1, each benchmark 1-3 (they build and convert a synthetic 11B-width checkpoint, ~20 GB disk).
#
#     bench/gpu_check.sh              # then copy the figures, with the card's name, into docs/PERFORMANCE.md
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/gpu-check}"
WORK="${WORK:-/tmp/lva-gpu-check}"
VENV=.venv-cuda
PIN="$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
stage() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }

stage "the card"
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: not an NVIDIA machine"; exit 1; }
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] ||
    { echo "gpu_check: no nvcc: install the CUDA toolkit"; exit 1; }
export PATH="$PATH:/usr/local/cuda/bin"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
nvcc --version | tail -1
echo "cores: $(nproc); $(python3 --version)"

stage "build $PIN with CUDA into $VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=native" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/python" -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python "$PIN"
"$VENV/bin/python" -m pip install --quiet -e '.[test]'

stage "did the build take? (lva info: a CUDA backend and a CUDA0 device)"
"$VENV/bin/python" -m assistant info
"$VENV/bin/python" -m assistant info | grep -q "^  CUDA0 " ||
    { echo "gpu_check: the build has no CUDA device"; exit 1; }

stage "parity and runtime tests on the GPU (load_model offloads every layer by default)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_runtime_parity.py tests/test_runtime.py \
    tests/test_text_parity.py --durations=5 || echo "gpu_check: TESTS FAILED (see above); going on to the benchmarks"

stage "bench/runtime_bench.py --quick (no HF reference here)"
"$VENV/bin/python" bench/runtime_bench.py --quick --work "$WORK" --reference-python none ||
    echo "gpu_check: runtime_bench FAILED"

stage "bench/device_bench.py --on gpu (per decoded token: CPU against the GPU, the hook's crossings)"
"$VENV/bin/python" bench/device_bench.py --on gpu --work "$WORK" || echo "gpu_check: device_bench FAILED"

stage "done; the log is $OUT/gpu_check.log"
