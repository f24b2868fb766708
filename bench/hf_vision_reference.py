"""HF transformers' Llama 3.2 Vision tower + projector in bf16 on one 4-tile image: the speed to beat.

Run by `bench/hf_reference.py` (for runtime_bench.py) with an interpreter that has torch and transformers
(the project's own environment has neither); prints one JSON object on stdout. The weights are random: the
speed of a dense bf16 forward does not depend on their values. One timed forward, no warm-up: at about 100 s
per forward on a 2-core machine a warm-up would double the cost, and the first call's one-off work
(allocations, kernel selection) is small next to it.

    /work/refvenv/bin/python bench/hf_vision_reference.py --threads 2
    /work/refvenv/bin/python bench/hf_vision_reference.py --local-layers 2 --global-layers 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers
from torch import nn
from transformers import MllamaVisionConfig
from transformers.models.mllama.modeling_mllama import MllamaVisionModel

TEXT_HIDDEN = 4096                   # the projector maps the vision output into the 11B text width
ASPECT_RATIO_2X2 = 6                 # 1-based index of [2, 2] in the supported aspect ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--local-layers", type=int, default=32, help="local encoder layers (11B: 32)")
    parser.add_argument("--global-layers", type=int, default=8, help="global encoder layers (11B: 8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = eleven_b_vision_config(args.local_layers, args.global_layers)
    started = time.perf_counter()
    vision = MllamaVisionModel(config).to(torch.bfloat16).eval()
    projector = nn.Linear(config.vision_output_dim, TEXT_HIDDEN).to(torch.bfloat16).eval()
    build_seconds = time.perf_counter() - started

    tiles = config.max_num_tiles
    pixel_values = torch.randn(1, 1, tiles, config.num_channels, config.image_size, config.image_size,
                               dtype=torch.bfloat16)
    aspect_ratio_ids = torch.tensor([[ASPECT_RATIO_2X2]])
    aspect_ratio_mask = torch.ones(1, 1, tiles, dtype=torch.long)
    with torch.inference_mode():
        started = time.perf_counter()
        features = vision(pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids,
                          aspect_ratio_mask=aspect_ratio_mask).last_hidden_state
        projected = projector(features)
        seconds = time.perf_counter() - started
    print(json.dumps({
        "seconds": seconds, "build_seconds": build_seconds, "threads": args.threads,
        "local_layers": args.local_layers, "global_layers": args.global_layers,
        "output_shape": list(projected.shape), "attn_implementation": config._attn_implementation,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }))


def eleven_b_vision_config(local_layers: int, global_layers: int) -> MllamaVisionConfig:
    """The published Llama 3.2 11B Vision `vision_config` (560-px tiles; the class default is 448)."""
    intermediate = [i for i in (3, 7, 15, 23, 30) if i < local_layers] or [0]
    return MllamaVisionConfig(
        hidden_size=1280, intermediate_size=5120, attention_heads=16, num_hidden_layers=local_layers,
        num_global_layers=global_layers, intermediate_layers_indices=intermediate,
        vision_output_dim=1280 * (1 + len(intermediate)), image_size=560, patch_size=14, max_num_tiles=4,
        norm_eps=1e-5, num_channels=3)


if __name__ == "__main__":
    main()
