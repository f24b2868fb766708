"""The first answer about a new image, lva against HF transformers on the same checkpoint, stage by stage.

What every CPU user feels on every new image: the time from asking to the first token. One run builds a
synthetic checkpoint at the real Llama 3.2 11B Vision widths (full vision tower, a shallower text tower:
`synthetic_pair.FULL`), converts it to Q4_K_M with lva's default F16 vision tower, and measures, each side
in a fresh process on the same thread count, two first answers about new 4-tile images in a row (the
first also pages the weights in and makes the one-time copies; the second shows the steady state), then
the tower alone on a 1-tile image:

- lva (`load_model`): preprocessing, the vision encoder, the projection + each cross layer's image K/V,
  the prompt's prefill, the first token (greedy), and the decode step after it;
- HF transformers (`generate`, in fp32 and in bf16; the faster is "HF at its best"):
  the processor, the vision tower, the projector, the text model's prefill (which projects the cross
  layers' K/V), the first token, and the decode step after it.

The targets of the speed issue: a 4-tile encode and the time to first token each at most 0.6 x HF's.

    python bench/first_answer_bench.py --work /tmp/lva-first-answer            # about 15 minutes on 2 cores
    python bench/first_answer_bench.py --work /tmp/lva-first-answer --reuse --write-docs

As an AVX2-only CPU would run it, on an AVX-512 machine: llama-cpp-python built without AVX-512 in its own
environment, our kernel's AVX2 path, torch's kernels limited to AVX2 and HF in fp32:

    LVA_ATTENTION=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        FBGEMM_ENABLE_INSTRUCTIONS=AVX2 /work/venv-avx2/bin/python bench/first_answer_bench.py --reuse \
        --hf-dtype float32 --section first-answer-avx2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from assistant import load_model  # noqa: E402
from convert.pipeline import convert, output_paths  # noqa: E402
from models import ggml  # noqa: E402
from models.kernels.paths import GGML_PRODUCTS  # noqa: E402
from tests.synthetic_checkpoint import write_checkpoint  # noqa: E402

from report import emulation_note, machine, write_section  # noqa: E402
from hf_reference import DEFAULT_REFERENCE_PYTHON  # noqa: E402
from synthetic_pair import FULL, QUICK, SHARD_BYTES, in_child, make_image  # noqa: E402

QUANT = "Q4_K_M"
PROMPT = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe this picture in one "
          "sentence.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
IMAGES = {"first.png": (1100, 1100, 1), "second.png": (1000, 1050, 2), "one-tile.png": (500, 400, 3)}
TARGET = 0.6
HEADING = "## The first answer about a new image (lva against HF transformers)"
INTRO = """\
The issue this answers: on a CPU, the first answer about a new image must come at most 0.6 × as late as
HF transformers' at its best on the same machine (the faster of its fp32 and bf16, both measured), and a
4-tile encode must take at most 0.6 × HF's tower. To rerun (about 15 minutes; it needs
about 20 GB of disk in `--work` and the `reference` extra in a second environment):

    python bench/first_answer_bench.py --work /tmp/lva-first-answer --write-docs"""


def main() -> int:
    args = parse_args()
    work, depth = Path(args.work), QUICK if args.quick else FULL
    checkpoint, pair = prepare(work, depth, args.threads, args.reuse)
    images = write_images(work)
    ours = in_child(measure_lva, pair.text, args.threads, [images["first.png"], images["second.png"]],
                    images["one-tile.png"])
    print(json.dumps(ours, indent=1), flush=True)
    dtypes = ("float32", "bfloat16") if args.hf_dtype == "best" else (args.hf_dtype,)
    runs = [measure_hf(args.reference_python, checkpoint, args.threads, dtype, images) for dtype in dtypes]
    for run in runs:
        print(json.dumps(run, indent=1), flush=True)
    hf = min(runs, key=lambda run: run["answers"][0]["first token"])       # HF at its best on this CPU
    hf["other"] = {run["dtype"]: run["answers"][0]["first token"] for run in runs if run is not hf}
    rates = in_child(product_rates, args.threads)
    report = render(ours, hf, rates, args.threads, depth)
    print(report)
    if args.write_docs:
        preamble = f"{HEADING}\n\n{INTRO}" if args.section == "first-answer" else f"### {args.section}"
        write_section(args.section, report, preamble)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/lva-first-answer", help="checkpoint, converted pair and images")
    parser.add_argument("--reuse", action="store_true", help="reuse the checkpoint and pair already in --work")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reference-python", default=str(DEFAULT_REFERENCE_PYTHON),
                        help="an interpreter with torch and transformers (the `reference` extra)")
    parser.add_argument("--hf-dtype", choices=["best", "bfloat16", "float32"], default="best",
                        help="best: both, and the faster is HF's figure (its first answer's time to first token)")
    parser.add_argument("--write-docs", action="store_true", help="rewrite this bench's section of PERFORMANCE.md")
    parser.add_argument("--quick", action="store_true", help="a shallow checkpoint, to check the script quickly")
    parser.add_argument("--section", default="first-answer", help="the section of PERFORMANCE.md --write-docs writes")
    args = parser.parse_args()
    if args.quick and args.write_docs:
        parser.error("--write-docs records the full-depth vision tower; drop --quick")
    return args


def prepare(work: Path, depth, threads: int, reuse: bool):
    checkpoint = work / f"checkpoint-{depth.name}"
    paths = output_paths(work / f"converted-{depth.name}", "synthetic-11b", QUANT)
    if not (reuse and (checkpoint / "config.json").exists()):
        print(f"building the checkpoint ({depth.describe()}) in {checkpoint}", flush=True)
        in_child(write_checkpoint, checkpoint, depth.config(), seed=0, shard_bytes=SHARD_BYTES)
    if not (reuse and paths.text.exists() and paths.vision.exists()):
        print(f"converting to {QUANT}", flush=True)
        in_child(convert, str(checkpoint), paths.text.parent, quant=QUANT, name="synthetic-11b", force=True,
                 threads=threads, progress=False)
    return checkpoint, paths


def write_images(work: Path) -> dict[str, Path]:
    paths = {}
    for name, (width, height, seed) in IMAGES.items():
        paths[name] = work / name
        make_image(width, height, seed).save(paths[name])
    return paths


# ------------------------------------------------------------------------------------------ lva


def measure_lva(text: Path, threads: int, images: list[Path], tower_image: Path) -> dict:
    """In a fresh process, as a person starting `lva` and asking about a new image would run it."""
    started = time.perf_counter()
    model = load_model(text, n_ctx=1024, n_threads=threads)
    load = time.perf_counter() - started
    ids = model.tokenize(PROMPT)
    answers = [lva_first_answer(model, ids, image) for image in images]
    started = time.perf_counter()
    model.encode_image(tower_image)
    tower = time.perf_counter() - started
    result = {"load": load, "answers": answers, "tower_only": tower, "paths": str(model.vision.tower.paths),
              "tokens": len(ids)}
    model.close()
    return result


def lva_first_answer(model, ids: list[int], image: Path) -> dict[str, float]:
    """Stamps: preprocessed, then each encoder stage (embeddings, the layers, projection + cross K/V)."""
    stamps: list[float] = []
    started = time.perf_counter()
    model.encode_image(image, progress=lambda _stage, _fraction: stamps.append(time.perf_counter()))
    logits = model.next_token_logits(ids, image)               # the prompt's prefill, the image from the cache
    first = int(np.argmax(logits))
    first_token = time.perf_counter()
    next(model.generate_tokens([*ids, first], image, max_tokens=1, temperature=0.0, stop_at_end_of_turn=False))
    decoded = time.perf_counter()
    return {
        "preprocessing": stamps[0] - started,
        "vision encoder": stamps[-2] - stamps[0],
        "projection + cross-layer K/V": stamps[-1] - stamps[-2],
        "prefill": first_token - stamps[-1],
        "first token": first_token - started,
        "first decode": decoded - first_token,
    }


def product_rates(threads: int) -> dict[str, float]:
    """GFLOP/s (integers: GOP/s) of the products at the encoder's widest shape, the bound's yardstick
    (vision_layer_bench): ggml's of F32, F16 and BF16 weights, and each of lva's this CPU runs."""
    import vision_layer_bench as layer
    from gguf import GGMLQuantizationType as Q

    backend = ggml.Backend(threads, ggml.cpu_device())
    rng = np.random.default_rng(0)
    rates = {}
    for name in ("BF16", "F16", "F32"):
        weights, memory = layer.random_layer(backend, Q[name], rng)
        with memory:
            rates[name] = layer.product_rate(backend, weights, GGML_PRODUCTS, 2)
    for path in layer.ours("products"):
        weights, memory = layer.random_layer(backend, Q.F16, rng)
        packed, copies = layer.with_copies(backend, weights, path)
        with memory, copies:
            rates[f"{path} (lva)"] = layer.product_rate(backend, packed, path, 2)
    backend.close()
    return rates


# ------------------------------------------------------------------------------------------ HF


def measure_hf(python: str, checkpoint: Path, threads: int, dtype: str, images: dict[str, Path]) -> dict:
    command = [python, str(REPO / "bench" / "hf_first_answer.py"), "--checkpoint", str(checkpoint),
               "--threads", str(threads), "--dtype", dtype, "--prompt", PROMPT,
               "--images", str(images["first.png"]), str(images["second.png"]),
               "--tower-image", str(images["one-tile.png"])]
    print("HF:", " ".join(command[:8]), "...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"the HF reference failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the report


def encode_flop(layers: int, tokens: int = 6432, real: int = 6404) -> float:
    """Matrix products and attention (QKᵀ, PV) of the encoder layers on 4 tile slots, encoder order."""
    d, f = 1280, 5120
    products = 2 * tokens * (4 * d * d + 2 * d * f)
    attention = 4 * d * (real * tokens + (tokens - real) * real)
    return layers * (products + attention)


def render(ours: dict, hf: dict, rates: dict[str, float], threads: int, depth) -> str:
    first, second = ours["answers"]
    hf_first, hf_second = hf["answers"]
    lva_encode = second["preprocessing"] + second["vision encoder"] + second["projection + cross-layer K/V"]
    hf_encode = hf_second["vision tower"] + hf_second["projector"]
    lines = [
        *emulation_note(),
        f"Measured {datetime.date.today().isoformat()} by `python bench/first_answer_bench.py --write-docs` on "
        f"{machine()}; {threads} threads for both; llama-cpp-python {version('llama-cpp-python')}; HF: torch "
        f"{hf['torch']}, transformers {hf['transformers']}, {hf['dtype']}, attention `{hf['attn_implementation']}`. "
        f"A synthetic random checkpoint ({depth.describe()}, bf16), the same files for both: HF loads it with "
        f"`from_pretrained`; lva converted it to {QUANT} text + F16 vision tower. lva's paths, as the calibration "
        f"chose them on this CPU: {ours['paths']}. HF at its best here: {hf['dtype']}"
        f"{''.join(f' (its {dtype} first token: {s:.1f} s)' for dtype, s in hf.get('other', {}).items())}. "
        f"The prompt is {ours['tokens']} tokens with one `<|image|>`; each image is new to the model; greedy.",
        "",
        "| stage | lva, first image s | lva, second image s | HF, first image s | HF, second image s |",
        "|---|--:|--:|--:|--:|",
    ]
    rows = [("preprocessing", "preprocessing", "preprocessing"),
            ("vision encoder (lva) / vision tower (HF)", "vision encoder", "vision tower"),
            ("projection + cross-layer K/V (lva) / projector (HF)", "projection + cross-layer K/V", "projector"),
            ("prompt prefill (HF: with the cross-layer K/V)", "prefill", "prefill"),
            ("**time to first token**", "first token", "first token"),
            ("first decode step after it", "first decode", "first decode")]
    for label, ours_key, hf_key in rows:
        lines.append(f"| {label} | {first[ours_key]:.2f} | {second[ours_key]:.2f} | {hf_first[hf_key]:.2f} | "
                     f"{hf_second[hf_key]:.2f} |")
    lines.append(f"| model load (before the question) | {ours['load']:.2f} | | {hf['load']:.2f} | |")
    paging = first["first token"] - second["first token"]
    lines += [
        "",
        f"The first answer's extra {paging:.1f} s over the second (lva) is paging the weights in from the "
        f"memory-mapped files and, where products run in BF16 or int16, making those copies of the tower's "
        f"matrices once.",
        "",
        "| image encode (tower + projector) | lva s | HF s | lva / HF | target |",
        "|---|--:|--:|--:|---|",
        f"| 1 tile (500×400) | {ours['tower_only']:.1f} | {hf['tower_only']:.1f} | "
        f"{ours['tower_only'] / hf['tower_only']:.2f} | |",
        f"| 4 tiles (second image) | {lva_encode:.1f} | {hf_encode:.1f} | {lva_encode / hf_encode:.2f} | "
        f"≤ {TARGET} × HF: {'PASS' if lva_encode <= TARGET * hf_encode else 'FAIL'} |",
        f"| time to first token, first image | {first['first token']:.1f} | {hf_first['first token']:.1f} | "
        f"{first['first token'] / hf_first['first token']:.2f} | ≤ {TARGET} × HF: "
        f"{'PASS' if first['first token'] <= TARGET * hf_first['first token'] else 'FAIL'} |",
        f"| time to first token, second image | {second['first token']:.1f} | {hf_second['first token']:.1f} | "
        f"{second['first token'] / hf_second['first token']:.2f} | ≤ {TARGET} × HF: "
        f"{'PASS' if second['first token'] <= TARGET * hf_second['first token'] else 'FAIL'} |",
    ]
    best_name = max(rates, key=rates.get)
    flop = encode_flop(depth.vision_layers + depth.global_layers)
    bound = flop / (rates[best_name] * 1e9)
    lines += [
        "",
        f"The CPU's bound: a 4-tile encode is {flop / 1e12:.1f} TFLOP of matrix products and attention; at "
        f"the fastest product rate measured in this run ({best_name}, {rates[best_name]:.0f} GFLOP/s on the "
        f"1280 → 5120 product; {', '.join(f'{k} {v:.0f}' for k, v in rates.items())}) that takes {bound:.1f} s. "
        f"lva's 4-tile encode reaches {100 * bound / lva_encode:.0f} % of that bound "
        f"({flop / lva_encode / 1e9:.0f} GFLOP/s on average, norms and activations included).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
