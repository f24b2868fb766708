"""torch's scaled_dot_product_attention on one vision encoder layer's shapes: the peer of our kernel.

Run by bench/vision_layer_bench.py with an interpreter that has torch (the `reference` extra); prints one
JSON object. HF's MllamaVisionAttention calls SDPA with the tokens tile-major and a 4-D mask that hides a
pair only when both tokens are padding; without a mask (the order lva runs) is timed too.

    /work/refvenv/bin/python bench/torch_attention.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, TILES, PER_TILE, REAL_PER_TILE = 16, 80, 4, 1608, 1601


def seconds(run, runs: int) -> float:
    """The best of `runs` timed calls, after one untimed call (it packs weights and warms the caches)."""
    run()
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--real-tiles", type=int, default=4, help="tiles of the image (the rest are padding)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = TILES * PER_TILE
    is_pad = torch.ones(TILES, PER_TILE, dtype=torch.bool)
    is_pad[:args.real_tiles, :REAL_PER_TILE] = False
    is_pad = is_pad.reshape(-1)
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(1, HEADS, tokens, HEAD_DIM, dtype=dtype) for _ in range(3))
        mask = torch.zeros(tokens, tokens, dtype=dtype)
        mask[is_pad[:, None] & is_pad[None, :]] = torch.finfo(dtype).min
        mask = mask[None, None]
        with torch.inference_mode():
            results[f"{dtype}".removeprefix("torch.") + ", HF's mask"] = seconds(
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), args.runs)
            results[f"{dtype}".removeprefix("torch.") + ", no mask"] = seconds(
                lambda: F.scaled_dot_product_attention(q, k, v), args.runs)
    print(json.dumps({"seconds": results, "tokens": tokens, "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
