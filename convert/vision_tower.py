"""The vision file: everything mllama adds to the Llama text model.

The image encoder and projector, the cross-attention layers (under their HF stack indices), the
`<|image|>` embedding, the hyperparameters and preprocessing constants, and the id shared with the
text file written in the same conversion.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T
from tqdm import tqdm

from convert.checkpoint import Checkpoint, source_name
from convert.gguf_output import PlannedTensor, add_metadata, write_gguf
from convert.quant_types import storage_type
from convert.text_tower import array_rows, checkpoint_rows
from models.mllama import gguf_keys as K
from models.mllama import weights as W
from models.mllama.hparams import MllamaHParams
from models.mllama.weights import Kind


def _tensor_type(kind: Kind, matrix_type: T, row_length: int) -> T:
    if kind == Kind.VECTOR:
        return T.F32
    if kind in (Kind.TABLE, Kind.CONV):
        return T.F32 if matrix_type == T.F32 else T.F16
    return storage_type(matrix_type, row_length)


def plan_vision_tensors(checkpoint: Checkpoint, vision_type: T, cross_type: T) -> list[PlannedTensor]:
    """Encoder and projector in `vision_type`, cross-attention matrices in `cross_type`, vectors in F32."""
    hp = checkpoint.hparams
    blocks = [(W.VisionEmbeddings, "", W.VISION_HF_PREFIX, vision_type), (W.Projector, "", "", vision_type)]
    blocks += [(W.VisionLayer, *W.vision_layer_prefixes(i), vision_type)
               for i in range(hp.vision.num_hidden_layers)]
    blocks += [(W.GlobalVisionLayer, *W.global_vision_layer_prefixes(i), vision_type)
               for i in range(hp.vision.num_global_layers)]
    blocks += [(W.CrossAttentionLayer, *W.cross_attention_prefixes(i), cross_type)
               for i in hp.text.cross_attention_layers]
    plans = []
    for block, gguf_prefix, hf_prefix, matrix_type in blocks:
        for name in W.names(block, gguf_prefix, hf_prefix):
            shape = checkpoint.entry(source_name(name)).shape
            plans.append(PlannedTensor(name.gguf, shape, _tensor_type(name.kind, matrix_type, shape[-1]),
                                       checkpoint_rows(checkpoint, source_name(name), shape[-1])))
    (image_token,) = W.names(W.ImageToken)
    embed = checkpoint.entry(source_name(image_token))
    row = embed.read_flat(hp.image_token_id * embed.shape[1], (hp.image_token_id + 1) * embed.shape[1])
    plans.append(PlannedTensor(image_token.gguf, row.shape, T.F32, array_rows(row)))
    return plans


def write_vision_gguf(checkpoint: Checkpoint, path: Path, vision_type: T, cross_type: T, name: str, quant: str,
                      text_file: str, pair_id: str, progress: tqdm) -> None:
    writer = gguf.GGUFWriter(path, K.ARCHITECTURE)
    vision_metadata(writer, checkpoint.hparams, name=name, license=checkpoint.license, quant=quant,
                    text_file=text_file, pair_id=pair_id)
    write_gguf(path, writer, plan_vision_tensors(checkpoint, vision_type, cross_type), progress)


def vision_metadata(writer: gguf.GGUFWriter, hparams: MllamaHParams, name: str, license: str | None, quant: str,
                    text_file: str, pair_id: str) -> None:
    """The keys of a vision file, whatever it was made from (a checkpoint, or an Ollama GGUF)."""
    writer.add_name(name)
    if license:
        writer.add_license(license)
    add_metadata(writer, {K.PAIR_ID: pair_id, K.TEXT_FILE: text_file, K.QUANT: quant})
    add_metadata(writer, hparams.gguf_metadata())
