"""`lva convert`: a Llama 3.2 Vision checkpoint (local or on the Hub) -> a text GGUF and a vision GGUF.

The text tower goes through llama.cpp's own quantizer for the quantized types, so its mixes are
exactly llama.cpp's; float types are written directly. The vision file is written here, its
cross-attention matrices quantized with ggml's quantizer to the matching type.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
from gguf import GGMLQuantizationType as T
from llama_cpp import _logger as llama_logger
from tqdm import tqdm

from convert import hub
from convert.checkpoint import Checkpoint
from convert.errors import ConvertError
from convert.gguf_output import PlannedTensor, part_path, published_together
from convert.quant_types import DEFAULT_QUANT, QUANT_TYPES, VISION_TYPES, QuantType, default_vision_type
from convert.text_tower import plan_text_tensors, source_float_type, write_text_gguf
from convert.vision_tower import plan_vision_tensors, write_vision_gguf

QUANTIZER_BUFFER_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class ConvertedPair:
    text: Path
    vision: Path


def output_paths(out_dir: Path, name: str, quant: str) -> ConvertedPair:
    return ConvertedPair(out_dir / f"{name}-text-{quant}.gguf", out_dir / f"{name}-vision-{quant}.gguf")


def parse_quant(quant: str) -> QuantType:
    try:
        return QUANT_TYPES[quant.upper()]
    except KeyError:
        raise ConvertError(f"unknown quant type {quant!r}; choose one of {', '.join(QUANT_TYPES)}") from None


def parse_vision_quant(vision_quant: str | None, quant: QuantType) -> T:
    if vision_quant is None:
        return default_vision_type(quant)
    try:
        return VISION_TYPES[vision_quant.upper()]
    except KeyError:
        raise ConvertError(f"unknown vision quant type {vision_quant!r}; choose one of "
                           f"{', '.join(VISION_TYPES)}") from None


def resolve_source(source: str) -> tuple[Path, str | None, str]:
    """(checkpoint directory, Hub URL if downloaded, default model name)."""
    path = Path(source).expanduser()
    if path.exists():
        return path, None, path.resolve().name
    if hub.looks_like_repo_id(source):
        return hub.download_checkpoint(source), f"https://huggingface.co/{source}", source.split("/")[-1]
    raise ConvertError(f"{source} is neither a checkpoint directory nor a Hugging Face repo id "
                       f"(like meta-llama/Llama-3.2-11B-Vision-Instruct)")


def convert(source: str, out_dir: Path, quant: str = DEFAULT_QUANT, vision_quant: str | None = None,
            name: str | None = None, force: bool = False, threads: int | None = None,
            progress: bool = True) -> ConvertedPair:
    """Convert `source` into `out_dir`; raises ConvertError (nothing written) for anything a user can fix."""
    quant_type = parse_quant(quant)
    vision_type = parse_vision_quant(vision_quant, quant_type)
    directory, source_url, default_name = resolve_source(source)
    checkpoint = Checkpoint.open(directory)
    model_name = name or default_name
    outputs = output_paths(out_dir, model_name, quant_type.name)
    existing = [p.name for p in (outputs.text, outputs.vision) if p.exists()]
    if existing and not force:
        raise ConvertError(f"{existing[0]} already exists in {out_dir}; pass --force to overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConvertError(f"cannot create {out_dir}: {e.strerror}") from None

    intermediate_type = quant_type.cross_attention if quant_type.is_float else source_float_type(checkpoint)
    text_plan = plan_text_tensors(checkpoint, intermediate_type)
    vision_plan = plan_vision_tensors(checkpoint, vision_type, quant_type.cross_attention)
    _check_disk_space(out_dir, text_plan, vision_plan, quantizing=not quant_type.is_float)

    pair_id = checkpoint.fingerprint()
    total = sum(4 * t.n_rows * t.row_length for t in text_plan + vision_plan)
    unquantized = part_path(out_dir / f".{outputs.text.stem}-unquantized.gguf")
    try:
        with published_together([outputs.text, outputs.vision]) as (text_part, vision_part), \
                tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {model_name}",
                     disable=None if progress else True, file=sys.stderr) as bar:  # None: off unless a TTY
            if quant_type.is_float:
                write_text_gguf(checkpoint, text_part, intermediate_type, model_name, source_url, pair_id, bar)
            else:
                write_text_gguf(checkpoint, unquantized, intermediate_type, model_name, source_url, pair_id, bar)
                bar.set_description(f"quantizing text to {quant_type.name} with llama.cpp")
                _quantize_text(unquantized, text_part, quant_type, threads)
                unquantized.unlink()
            bar.set_description(f"writing vision ({vision_type.name}, cross-attention {quant_type.name})")
            write_vision_gguf(checkpoint, vision_part, vision_type, quant_type.cross_attention, model_name,
                              quant_type.name, outputs.text.name, pair_id, bar)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConvertError(f"no space left on the device holding {out_dir}; nothing was kept") from None
        raise ConvertError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    finally:
        unquantized.unlink(missing_ok=True)
    return outputs


def _quantize_text(source: Path, target: Path, quant: QuantType, threads: int | None) -> None:
    """llama.cpp's quantizer, with its own per-tensor mix for `quant`, silenced but for errors."""
    llama_logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant.llama_ftype
    params.nthread = threads or os.cpu_count() or 1
    params.max_buf_size = QUANTIZER_BUFFER_BYTES
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        if shutil.disk_usage(target.parent).free < source.stat().st_size // 4:
            raise OSError(errno.ENOSPC, "no space left")
        raise ConvertError(f"llama.cpp could not quantize the text tower to {quant.name}")


def _check_disk_space(out_dir: Path, text_plan: list[PlannedTensor], vision_plan: list[PlannedTensor],
                      quantizing: bool) -> None:
    """Refuse before writing when the outputs (and the quantizer's input) cannot fit."""
    text_bytes = sum(t.nbytes for t in text_plan)
    needed = text_bytes * (2 if quantizing else 1) + sum(t.nbytes for t in vision_plan)
    free = shutil.disk_usage(out_dir).free
    if needed > free:
        raise ConvertError(f"not enough disk space in {out_dir}: the conversion needs about "
                           f"{needed / 1e9:.1f} GB, {free / 1e9:.1f} GB are free")
