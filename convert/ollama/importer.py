"""`lva import`: an Ollama `mllama` model -> lva's pair, NAME-text-QUANT.gguf and NAME-vision-QUANT.gguf.

Nothing is requantized: every tensor's stored bytes are copied block for block. Only what must change
changes (docs/OLLAMA.md says why for each):
- names, and the text layers' numbering: the self-attention layers become blk.0..n-1 of a plain `llama`
  file, the cross-attention layers go to the vision file under their stack index;
- the rows of the q/k projections a v0.7.1+ converter permuted: vision layers (mathematically a no-op
  there, undone so the bytes match a conversion) and cross-attention layers (not a no-op: Ollama left
  their q_norm/k_norm unpermuted; un-permuting the rows and keeping the norms restores the model);
  a quantized row is whole blocks, so this reorders rows and keeps every row's bytes;
- the gates Ollama stored through tanh go back to raw values (arctanh), which lva's runtime tanh's;
- `<|image|>`'s row of Ollama's token_embd becomes the vision file's image_token_embd (as float32);
- the text vocabulary stops before `<|image|>`; a GGUF without a jinja chat template gets the published one;
- the pair is named, and its `general.file_type` written, from the text tensors' types (models/file_type.py):
  Ollama's converter writes general.file_type 1 (F16) whatever its tensors are.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType
from tqdm import tqdm

from convert.gguf_output import CopiedTensor, PlannedTensor, add_metadata, published_together, write_gguf
from convert.ollama.chat_template import LLAMA_3_2_VISION_INSTRUCT
from convert.ollama.mllama_file import POSITION_GATE_COMPLEMENT, V0_7_1, ConverterVersion, OllamaMllamaFile
from convert.ollama.store import OllamaError, OllamaModel
from convert.pipeline import ConvertedPair, output_paths
from convert.text_tower import array_rows, llama_metadata, rope_permute
from convert.vision_tower import vision_metadata
from models.file_type import FileTypeError, file_type_of, quant_name
from models.mllama import gguf_keys as K
from models.mllama import weights as W
from models.mllama.weights import Kind

TEMPLATE_FROM_GGUF = "ollama-gguf"
TEMPLATE_PUBLISHED = "llama-3.2-vision-instruct"
# Every converter since v0.7.0 stores these through tanh (convert_mllama.go, mllamaModel.repack).
TANH_GATES = {"pre_tile_gate", "position_gate", "post_tile_gate"}
# From v0.7.1 on (#10807) also the global layers' gates.
TANH_GATES_SINCE_V0_7_1 = {"attn_gate", "ffn_gate"}
LEGACY = ("{name} is in Ollama's legacy two-file format (a model blob and a projector blob, Ollama v0.4-v0.6), "
          "which lva does not import; pull it again in the current format with `lva pull {name}`")


@dataclass(frozen=True)
class ImportedPair(ConvertedPair):
    converter: ConverterVersion
    chat_template_source: str


def import_model(model: OllamaModel, out_dir: Path, name: str | None = None, force: bool = False,
                 progress: bool = True) -> ImportedPair:
    """Write lva's pair for `model` into `out_dir`; raises OllamaError (nothing written) for what a user can fix."""
    label = str(model.name)
    if model.is_legacy_mllama:
        raise OllamaError(LEGACY.format(name=label))
    layer = model.manifest.model_layer(label)
    blob = model.blob(layer)
    check_blob(blob, layer.size, label)
    source = OllamaMllamaFile(blob, label)
    converter = source.converter_version
    text_plan, vision_plan = plan_text_tensors(source), plan_vision_tensors(source, converter)
    file_type = text_file_type(text_plan, label)
    outputs = output_paths(out_dir, name or model.name.lva_name, quant_name(file_type))
    existing = [p.name for p in (outputs.text, outputs.vision) if p.exists()]
    if existing and not force:
        raise OllamaError(f"{existing[0]} already exists in {out_dir}; pass --force to overwrite")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OllamaError(f"cannot create {out_dir}: {e.strerror}") from None

    total = sum(t.nbytes for t in text_plan + vision_plan)       # the headers are small beside the tensors
    free = shutil.disk_usage(out_dir).free
    if total > free:
        raise OllamaError(f"not enough disk space in {out_dir}: the import needs about {total / 1e9:.1f} GB, "
                          f"{free / 1e9:.1f} GB are free")
    template_source = TEMPLATE_FROM_GGUF if source.chat_template else TEMPLATE_PUBLISHED
    _write_pair(model, source, outputs, file_type, text_plan, vision_plan, template_source, progress)
    return ImportedPair(outputs.text, outputs.vision, converter, template_source)


def _write_pair(model: OllamaModel, source: OllamaMllamaFile, outputs: ConvertedPair, file_type: LlamaFileType,
                text_plan: list[PlannedTensor], vision_plan: list[PlannedTensor], template_source: str,
                progress: bool) -> None:
    """Both files as .part, renamed into place together once complete (as `lva convert` writes)."""
    layer = model.manifest.model_layer(str(model.name))
    name = model.name
    provenance = {K.OLLAMA_MODEL: f"{name.host}/{name.namespace}/{name.model}:{name.tag}@{layer.digest}",
                  K.OLLAMA_CONVERTER: f"{source.converter_version.version}: {source.converter_version.evidence}"}
    pair_id = hashlib.sha256(f"ollama:{layer.digest}".encode()).hexdigest()[:32]
    lva_name = outputs.text.name.rsplit("-text-", 1)[0]
    out_dir = outputs.text.parent
    try:
        with published_together([outputs.text, outputs.vision]) as (text_part, vision_part), \
                tqdm(total=sum(t.nbytes for t in text_plan + vision_plan), unit="B", unit_scale=True,
                     desc=f"importing {name}", disable=None if progress else True, file=sys.stderr) as bar:
            writer = gguf.GGUFWriter(text_part, "llama")
            llama_metadata(writer, source.hparams.text, source.vocabulary,
                           source.chat_template or LLAMA_3_2_VISION_INSTRUCT,
                           file_type=file_type, name=lva_name, source_url=None, license=None,
                           pair_id=pair_id)
            add_metadata(writer, {**provenance, K.CHAT_TEMPLATE_SOURCE: template_source})
            write_gguf(text_part, writer, text_plan, bar)
            writer = gguf.GGUFWriter(vision_part, K.ARCHITECTURE)
            vision_metadata(writer, source.hparams, name=lva_name, license=None, quant=quant_name(file_type),
                            text_file=outputs.text.name, pair_id=pair_id)
            add_metadata(writer, provenance)
            write_gguf(vision_part, writer, vision_plan, bar)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OllamaError(f"no space left on the device holding {out_dir}; nothing was kept") from None
        raise OllamaError(f"cannot write to {out_dir}: {e.strerror or e}") from None


def text_file_type(text_plan: list[PlannedTensor], label: str) -> LlamaFileType:
    """What the text file holds, from its tensors: Ollama's converter writes general.file_type 1 (F16) into
    every file, whatever its tensors (BF16 from Meta's checkpoints since v0.11.1)."""
    try:
        return file_type_of((t.qtype, t.shape) for t in text_plan)
    except FileTypeError as e:
        raise OllamaError(f"the model blob of {label} cannot be named: {e}") from None


def check_blob(blob: Path, size: int, label: str) -> None:
    """The blob the manifest names is there and as long as the manifest says."""
    if not blob.is_file():
        raise OllamaError(f"the manifest of {label} names blob {blob.name}, which is missing from {blob.parent}; "
                          f"pull the model again")
    if not os.access(blob, os.R_OK):
        raise OllamaError(f"cannot read {blob} (permission denied); Ollama's Linux service keeps its store for "
                          f"the ollama user: run lva as a user who can read it")
    actual = blob.stat().st_size
    if actual != size:
        state = "truncated" if actual < size else "larger than its manifest says"
        raise OllamaError(f"the model blob of {label} ({blob.name}) is {state} ({actual} of {size} bytes); "
                          f"pull the model again")


# ---------------------------------------------------------------------------------------------- the text file


def plan_text_tensors(source: OllamaMllamaFile) -> list[PlannedTensor]:
    """The `llama` tensors: token_embd cut to the text vocabulary, the self-attention layers renumbered."""
    text = source.hparams.text
    plans = []
    for name in W.names(W.TextModel):
        if name.field == "rope_freqs" and name.ollama not in source.tensors:
            continue                                       # plain RoPE: Ollama wrote no factors
        shape = source.shape(name.ollama)
        if name.field == "token_embd":
            shape = (text.vocab_size, shape[1])            # <|image|> and the padding rows stay behind
        plans.append(_tensor(source, name, shape=shape))
    for gguf_index, stack_index in enumerate(text.self_attention_layers):
        prefixes = (*W.self_attention_prefixes(gguf_index, stack_index), W.ollama_text_layer_prefix(stack_index))
        plans += [_tensor(source, name) for name in W.names(W.SelfAttentionLayer, *prefixes)]
    return plans


# ---------------------------------------------------------------------------------------------- the vision file


def plan_vision_tensors(source: OllamaMllamaFile, converter: ConverterVersion) -> list[PlannedTensor]:
    """Encoder, projector, cross-attention layers and the `<|image|>` row, undoing Ollama's transforms."""
    hp = source.hparams
    since_v0_7_1 = converter.version == V0_7_1
    vision_heads = hp.vision.attention_heads
    # Rows a v0.7.1+ converter permuted per head, by field: the head count it permuted with.
    permuted = {"attn_q": vision_heads, "attn_k": vision_heads} if since_v0_7_1 else {}
    cross_permuted = ({"attn_q": hp.text.num_attention_heads, "attn_k": hp.text.num_key_value_heads}
                      if since_v0_7_1 else {})
    tanh_gates = TANH_GATES | (TANH_GATES_SINCE_V0_7_1 if since_v0_7_1 else set())

    blocks: list[tuple[type, tuple[str, str, str], dict[str, int]]] = [
        (W.VisionEmbeddings, ("", "", ""), {}), (W.Projector, ("", "", ""), {})]
    for i in range(hp.vision.num_hidden_layers):
        blocks.append((W.VisionLayer, (*W.vision_layer_prefixes(i), W.vision_layer_prefixes(i)[0]), permuted))
    for i in range(hp.vision.num_global_layers):
        prefixes = (*W.global_vision_layer_prefixes(i), W.global_vision_layer_prefixes(i)[0])
        blocks.append((W.GlobalVisionLayer, prefixes, permuted))
    for i in hp.text.cross_attention_layers:
        blocks.append((W.CrossAttentionLayer, (*W.cross_attention_prefixes(i), W.ollama_text_layer_prefix(i)),
                       cross_permuted))
    _check_position_gates(source)
    plans = []
    for block, prefixes, heads in blocks:
        gates = tanh_gates if block in (W.VisionEmbeddings, W.GlobalVisionLayer) else set()
        for name in W.names(block, *prefixes):
            if name.field in gates:
                plans.append(_gate_from_tanh(source, name))
            else:
                plans.append(_tensor(source, name, unpermute_heads=heads.get(name.field)))
    (image_token,) = W.names(W.ImageToken)
    row = source.rows_as_float(image_token.ollama, hp.image_token_id, hp.image_token_id + 1).reshape(-1)
    plans.append(PlannedTensor(image_token.gguf, row.shape, T.F32, array_rows(row)))
    return plans


def _tensor(source: OllamaMllamaFile, name: W.WeightName, shape: tuple[int, ...] | None = None,
            unpermute_heads: int | None = None) -> PlannedTensor:
    """The tensor as Ollama stored it (optionally with its rows un-permuted); vectors as float32 for the runtime."""
    shape = shape or source.shape(name.ollama)
    qtype = source.tensor(name.ollama).tensor_type
    if name.kind == Kind.VECTOR and qtype != T.F32:
        return PlannedTensor(name.gguf, shape, T.F32, lambda a, b: source.rows_as_float(name.ollama, a, b))
    raw = source.raw_rows(name.ollama)
    if unpermute_heads is None:
        return CopiedTensor(name.gguf, shape, qtype, lambda a, b: raw[a:b])
    # Ollama's repack (llamaModel.repack / mllamaModel.repack) is our converter's rope_permute: invert it.
    order = np.argsort(rope_permute(np.arange(raw.shape[0]), unpermute_heads))
    return CopiedTensor(name.gguf, shape, qtype, lambda a, b: raw[order[a:b]])


def raw_gate(stored: float) -> float:
    """The gate g with float32 tanh(g) == `stored` (Ollama's float32 tanh(g)) within one float32 step.

    tanh saturates: for |g| beyond ~9 every g has tanh 1.0 in float32, so such a g cannot be recovered, only
    a g with the same tanh; the runtime only ever uses tanh(g). |stored| = 1 maps to the float32 just below.
    """
    limit = float(np.nextafter(np.float32(1), np.float32(0)))
    return float(np.float32(np.arctanh(np.clip(stored, -limit, limit))))


def _gate_from_tanh(source: OllamaMllamaFile, name: W.WeightName) -> PlannedTensor:
    gate = np.asarray([raw_gate(source.scalar(name.ollama))], dtype=np.float32)
    return PlannedTensor(name.gguf, gate.shape, T.F32, array_rows(gate))


def _check_position_gates(source: OllamaMllamaFile) -> None:
    """Ollama writes the position gate twice, as 1 - tanh(g) and tanh(g): they must sum to one."""
    (position_gate,) = (n for n in W.names(W.VisionEmbeddings) if n.field == "position_gate")
    total = source.scalar(POSITION_GATE_COMPLEMENT) + source.scalar(position_gate.ollama)
    if abs(total - 1) > 1e-6:
        raise OllamaError(f"the position gates of {source.label} are not Ollama's (1 - tanh, tanh) pair "
                          f"(they sum to {total:.6f}); was this file written by Ollama's converter?")
