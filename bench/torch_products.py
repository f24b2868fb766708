"""torch's matrix products on one vision encoder layer's widest product: the peers of ggml's.

Run by bench/vision_layer_bench.py with an interpreter that has torch (the `reference` extra); prints one
JSON object. The product is ffn_up, 1280 -> 5120 over 6432 tokens, as `nn.Linear` runs it in HF's tower
(fp32 and bf16), and in 8-bit integers, which HF's tower never runs: what a well-tuned integer GEMM reaches
on this CPU, the one kind of arithmetic that can pass the FMA peak on an AVX2-only CPU.

- int8 dynamic (FBGEMM): `quantize_dynamic`'s Linear, which quantizes the activations at each call;
- int8 × int8 → int32 (oneDNN): `torch._int_mm`, the integer product alone.

    /work/refvenv/bin/python bench/torch_products.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
import torch.nn.functional as F
from torch_attention import seconds

TOKENS, WIDTH, INTERMEDIATE = 6432, 1280, 5120


def int8_dynamic_linear(weight: torch.Tensor) -> torch.nn.Module:
    torch.backends.quantized.engine = "fbgemm"
    linear = torch.nn.Linear(WIDTH, INTERMEDIATE, bias=False)
    linear.weight.data.copy_(weight)
    with warnings.catch_warnings():                 # torch.ao's eager quantization warns that it moves to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, w = torch.randn(TOKENS, WIDTH), torch.randn(INTERMEDIATE, WIDTH) * WIDTH ** -0.5
    results = {}
    with torch.inference_mode():
        results["float32 (HF's fp32 Linear)"] = seconds(lambda: F.linear(x, w), args.runs)
        xb, wb = x.bfloat16(), w.bfloat16()
        results["bfloat16 (HF's bf16 Linear)"] = seconds(lambda: F.linear(xb, wb), args.runs)
        dynamic = int8_dynamic_linear(w)
        results["int8 dynamic Linear (FBGEMM)"] = seconds(lambda: dynamic(x), args.runs)
        xi = torch.randint(-127, 128, (TOKENS, WIDTH), dtype=torch.int8)
        wi = torch.randint(-127, 128, (WIDTH, INTERMEDIATE), dtype=torch.int8)
        results["int8 × int8 → int32, `_int_mm` (oneDNN)"] = seconds(lambda: torch._int_mm(xi, wi), args.runs)
    print(json.dumps({"seconds": results, "flop": 2 * TOKENS * WIDTH * INTERMEDIATE, "threads": args.threads,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
