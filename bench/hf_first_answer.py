"""HF transformers' first answer about a new image, stage by stage: the peer of bench/first_answer_bench.py.

Run by that script with an interpreter that has torch and transformers (the `reference` extra); prints
one JSON object on stdout. It loads the synthetic checkpoint with `from_pretrained` in the given dtype and,
for each image in turn (all new to the model), times what a person waits for: the processor, the vision
tower, the projector, the text model's prefill (which computes each cross layer's image K/V), the first
token, and the first decode step after it. Forward hooks stamp the stages; a logits processor stamps each
generated token. Then the tower + projector alone on a 1-tile image.

    /work/refvenv/bin/python bench/hf_first_answer.py --checkpoint /tmp/lva-first-answer/checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList, MllamaForConditionalGeneration
from transformers import MllamaProcessor
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil


class Stamps(LogitsProcessor):
    """Remembers when each token's logits arrive (the first: after the prefill)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hook_stamps(module: torch.nn.Module, name: str, stamps: dict[str, float]) -> None:
    """The first call's start and end (a hook that returns something would replace the inputs or outputs)."""
    def stamp(key: str) -> None:
        stamps.setdefault(key, time.perf_counter())

    module.register_forward_pre_hook(lambda *_: stamp(f"{name} start"))
    module.register_forward_hook(lambda *_: stamp(f"{name} end"))


def first_answer(model, processor, prompt: str, image: Image.Image) -> dict[str, float]:
    stamps: dict[str, float] = {}
    for name, module in (("vision", model.model.vision_model), ("projector", model.model.multi_modal_projector),
                         ("text", model.model.language_model)):
        hook_stamps(module, name, stamps)
    tokens = Stamps()
    started = time.perf_counter()
    with torch.inference_mode():
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        preprocessed = time.perf_counter()
        model.generate(**inputs, max_new_tokens=2, do_sample=False, logits_processor=LogitsProcessorList([tokens]))
    for module in (model.model.vision_model, model.model.multi_modal_projector, model.model.language_model):
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return {
        "preprocessing": preprocessed - started,
        "vision tower": stamps["vision end"] - stamps["vision start"],
        "projector": stamps["projector end"] - stamps["projector start"],
        "prefill": tokens.times[0] - stamps["projector end"],
        "first token": tokens.times[0] - started,
        "first decode": tokens.times[1] - tokens.times[0],
        "tokens": int(inputs["input_ids"].shape[1]),
    }


def tower_only(model, processor, image: Image.Image) -> float:
    """Vision tower + projector on one image, as bench/hf_vision_reference.py times it."""
    inputs = processor.image_processor(images=[[image]], return_tensors="pt")
    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        started = time.perf_counter()
        features = model.model.vision_model(pixel_values=inputs["pixel_values"].to(dtype),
                                            aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                            aspect_ratio_mask=inputs["aspect_ratio_mask"])
        model.model.multi_modal_projector(features.last_hidden_state)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--images", nargs="+", required=True, help="new images, answered in order")
    parser.add_argument("--tower-image", required=True, help="an image timed through the tower alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model = MllamaForConditionalGeneration.from_pretrained(args.checkpoint, dtype=getattr(torch, args.dtype)).eval()
    processor = MllamaProcessor(image_processor=MllamaImageProcessorPil.from_pretrained(args.checkpoint),
                                tokenizer=AutoTokenizer.from_pretrained(args.checkpoint))
    load_seconds = time.perf_counter() - started
    answers = [first_answer(model, processor, args.prompt, Image.open(path).convert("RGB")) for path in args.images]
    tower = tower_only(model, processor, Image.open(args.tower_image).convert("RGB"))
    print(json.dumps({
        "load": load_seconds, "answers": answers, "tower_only": tower, "dtype": args.dtype, "threads": args.threads,
        "attn_implementation": model.config._attn_implementation,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
