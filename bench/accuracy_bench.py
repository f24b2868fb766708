"""How far each arithmetic moves the K/V an image leaves in the cross layers, against HF transformers' own bf16.

The bound every path must meet (the speed issue): its relative error on an image's cross-attention K/V,
against HF fp32 patched to Meta's semantics, at most HF bf16's own error on the same image. Measured on a
checkpoint at the real vision widths (32 local + 8 global layers of 1280) whose local layers write a few
residual channels 30x larger (`write_checkpoint(outlier_channels=...)`), as trained ViTs do: the case
that hurts low-precision arithmetic, whose scales those channels set. One 4-tile image.

For each path (attention x products x the MLP's down product; LVA_ATTENTION, LVA_PRODUCTS and LVA_MLP_DOWN
force them) lva encodes the image and
its K/V are compared with HF's fp32 ones: ||lva - HF fp32|| / ||HF fp32|| over each cross layer's K and
V, the largest of them. HF bf16 (the checkpoint loaded in bfloat16) gives the bound the same way.

    python bench/accuracy_bench.py --work /tmp/lva-accuracy                 # about 20 minutes on 2 cores
    python bench/accuracy_bench.py --work /tmp/lva-accuracy --reuse --write-docs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from assistant import load_model  # noqa: E402
from convert.pipeline import convert  # noqa: E402
from tests.synthetic_checkpoint import eleven_b_config, write_checkpoint  # noqa: E402

from report import machine, write_section  # noqa: E402

DEFAULT_REFERENCE_PYTHON = "/work/refvenv/bin/python"
OUTLIER_CHANNELS = (3, 400, 777, 1100)
# (attention, products, the MLP's down product): each arithmetic alone beside F32, then the combinations
# the calibration may pick, the least accurate of each op together among them, then int8 everywhere.
PATHS = [("f32", "f32", "f32"), ("f32", "ggml", "ggml"), ("f32", "ggml-bf16", "ggml-bf16"),
         ("f32", "int16", "int16"), ("f32", "f32", "int8"), ("f32", "int8", "int8"),
         ("int16", "f32", "f32"), ("bf16", "f32", "f32"), ("ggml", "f32", "f32"),
         ("int16", "int16", "int16"), ("bf16", "ggml-bf16", "ggml-bf16"), ("bf16", "int16", "int16"),
         ("bf16", "int16", "int8"), ("int16", "int16", "int8"), ("bf16", "ggml-bf16", "int8"),
         ("ggml", "ggml-bf16", "int8"), ("bf16", "int8", "int8")]


def image(path: Path) -> Path:
    """A 1100 x 1100 photo-like image (gradients, waves and noise): 2 x 2 tiles."""
    y, x = np.mgrid[0:1100, 0:1100] / 1100.0
    rng = np.random.default_rng(7)
    channels = [np.sin(6 * x + 3 * c) * np.cos(4 * y - c) for c in range(3)]
    pixels = (np.stack(channels, axis=-1) * 90 + 128 + rng.normal(0, 20, (1100, 1100, 3))).clip(0, 255)
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(path)
    return path


def relative_error(kv: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return max(float(np.linalg.norm(kv[name] - reference[name]) / np.linalg.norm(reference[name]))
               for name in reference)


def lva_kv(text_file: Path, picture: Path, attention: str, products: str, mlp_down: str,
           threads: int) -> dict[str, np.ndarray]:
    """lva's K/V of the image as [tokens, kv_heads, head_dim] float32, keyed as hf_image_kv.py keys them."""
    os.environ["LVA_ATTENTION"], os.environ["LVA_PRODUCTS"], os.environ["LVA_MLP_DOWN"] = attention, products, mlp_down
    model = load_model(text_file, n_ctx=256, n_threads=threads)
    try:
        _, kv = model.encode_image(picture)
        arrays = kv.to_arrays()
        paths = model.vision.tower.paths
    finally:
        model.close()
    found = {}
    for name, array in arrays.items():
        array = array.astype(np.float32)
        # keys: [kv_heads, tokens, hd] -> [tokens, kv_heads, hd]; values: [kv_heads, hd, tokens] -> the same
        found[name] = array.transpose(1, 0, 2) if name.startswith("k.") else array.transpose(2, 0, 1)
    found["paths"] = np.array(f"attention {paths.attention}, products {paths.products}, MLP down {paths.mlp_down}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lva-accuracy"))
    parser.add_argument("--reuse", action="store_true", help="keep the checkpoint, conversion and HF results")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reference-python", default=DEFAULT_REFERENCE_PYTHON)
    parser.add_argument("--paths", nargs="+", metavar="ATTENTION/PRODUCTS[/MLP_DOWN]",
                        help="only these rows (as LVA_ATTENTION/LVA_PRODUCTS/LVA_MLP_DOWN name them; the MLP's "
                             "down product as the others unless said), e.g. f32/int8 bf16/int16/int8")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["LVA_HOME"] = str(args.work / "home")
    checkpoint = args.work / "checkpoint"
    if not (args.reuse and (checkpoint / "config.json").exists()):
        config = eleven_b_config(2, [1], 32, 8)
        config["vision_config"]["intermediate_layers_indices"] = [3, 7, 15, 23, 30]      # the published ones
        write_checkpoint(checkpoint, config, shard_bytes=2 * 10**9, outlier_channels=OUTLIER_CHANNELS)
    converted = args.work / "converted"
    text_files = sorted(converted.glob("*-text-*.gguf")) if converted.exists() else []
    if not (args.reuse and text_files):
        text_files = [convert(str(checkpoint), converted, quant="F16", force=True, progress=False).text]
    picture = image(args.work / "four-tiles.png")

    references = {}
    for dtype in ("float32", "bfloat16"):
        out = args.work / f"hf-{dtype}.npz"
        if not (args.reuse and out.exists()):
            run = subprocess.run([args.reference_python, str(REPO / "bench" / "hf_image_kv.py"), str(checkpoint),
                                  str(picture), str(out), "--dtype", dtype, "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            print(f"HF {dtype}: {run.stdout.strip()}", flush=True)
        with np.load(out) as arrays:
            references[dtype] = {name: arrays[name] for name in arrays.files}
    bound = relative_error(references["bfloat16"], references["float32"])
    print(f"HF bf16 against HF fp32: {bound:.3g}", flush=True)

    rows = []
    chosen = [(*p.split("/"), p.split("/")[-1])[:3] for p in args.paths] if args.paths else PATHS
    for attention, products, mlp_down in chosen:
        found = lva_kv(text_files[0], picture, attention, products, mlp_down, args.threads)
        paths = str(found.pop("paths"))
        error = relative_error(found, references["float32"])
        rows.append((paths, error))
        print(f"{paths}: {error:.3g} ({error / bound:.2f} x HF bf16's)", flush=True)

    lines = [f"Measured {datetime.date.today()} by `python bench/accuracy_bench.py` on {machine()}. A synthetic "
             f"checkpoint at the real Llama 3.2 11B Vision widths (32 local + 8 global vision layers of 1280, the "
             f"projector, one cross layer), bf16, whose local layers' fc2 write residual channels "
             f"{', '.join(map(str, OUTLIER_CHANNELS))} 30x larger; lva's file: F16 tower, F16 image K/V. One 4-tile "
             f"image. *Error*: max over the cross layer's K and V of ||x - HF fp32|| / ||HF fp32||, HF fp32 patched "
             f"to Meta's semantics as the parity references are.", "",
             "| path | K/V error | × HF bf16's | within the bound |", "|---|--:|--:|---|",
             f"| HF transformers bf16 (the bound) | {bound:.2e} | 1.00 | |"]
    for paths, error in rows:
        lines.append(f"| lva: {paths} | {error:.2e} | {error / bound:.2f} | {'yes' if error <= bound else '**no**'} |")
    report = "\n".join(lines)
    print(report)
    (args.work / "accuracy.json").write_text(json.dumps({"bound": bound, "rows": rows}, indent=1))
    if args.write_docs:
        write_section("accuracy", report)


if __name__ == "__main__":
    main()
