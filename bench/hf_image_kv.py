"""HF transformers' K/V of every cross-attention layer for one image: the reference of the accuracy bench.

Run by bench/accuracy_bench.py with an interpreter that has torch and transformers (the `reference`
extra). Loads the saved checkpoint in float32 (the references) or bfloat16 (HF's own low precision, the
bound), patched to Meta's semantics (the vision encoder's intermediates are its layers' inputs), runs the
vision tower and the projector on one image, applies each cross layer's k_proj, k_norm and v_proj, and
saves K and V of the image's real tiles as float32 [tokens, kv_heads, head_dim] in an .npz, keyed
`k.INDEX` and `v.INDEX` by the cross layer's stack index.

    /work/refvenv/bin/python bench/hf_image_kv.py CHECKPOINT IMAGE OUT.npz --dtype float32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, MllamaForConditionalGeneration

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "fixtures"))        # make_fixtures imports its neighbours by name

from tests.fixtures.make_fixtures import meta_semantics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = MllamaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype).eval()
    processor = AutoImageProcessor.from_pretrained(args.checkpoint)
    inputs = processor(images=[[Image.open(args.image).convert("RGB")]], return_tensors="pt")
    tiles = int(inputs["aspect_ratio_mask"].sum())
    started = time.perf_counter()
    with meta_semantics(cross_attention_row_mask=False), torch.inference_mode():
        vision = model.model.vision_model(pixel_values=inputs["pixel_values"].to(dtype),
                                          aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                          aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        states = model.model.multi_modal_projector(vision).reshape(1, -1, model.config.text_config.hidden_size)
        states = states[:, :tiles * vision.shape[-2]]                       # the real tiles' tokens
        arrays = {}
        for index in model.config.text_config.cross_attention_layers:
            attention = model.model.language_model.layers[index].cross_attn
            heads, head_dim = attention.num_key_value_heads, attention.head_dim
            key = attention.k_norm(attention.k_proj(states).view(1, -1, heads, head_dim))
            value = attention.v_proj(states).view(1, -1, heads, head_dim)
            arrays[f"k.{index}"] = key[0].float().numpy()
            arrays[f"v.{index}"] = value[0].float().numpy()
    seconds = time.perf_counter() - started
    np.savez(args.out, **arrays)
    print(json.dumps({"seconds": seconds, "tiles": tiles, "dtype": args.dtype, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
