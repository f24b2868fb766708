"""A Hugging Face Llama 3.2 Vision checkpoint directory, checked before anything is written.

Every way a directory can be wrong (another model, a missing shard or tensor, a truncated file, no
tokenizer) is found here and reported in one line, so a conversion either starts on sound input or
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from convert.errors import ConvertError
from convert.safetensors_file import TensorEntry, read_header
from models.mllama import weights as W
from models.mllama.hparams import HParamsError, ImagePreprocessing, MllamaHParams, TextHParams, VisionHParams

SUPPORTED_MODEL_TYPE = "mllama"
INDEX_FILE = "model.safetensors.index.json"

# Newer transformers save the same weights under other prefixes; read both layouts.
PREFIX_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


@dataclass
class Checkpoint:
    directory: Path
    config: dict[str, Any]
    hparams: MllamaHParams
    tensors: dict[str, TensorEntry]
    tokenizer: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str | None
    license: str | None

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        if not directory.is_dir():
            raise ConvertError(f"{directory} is not a directory")
        config = _read_json(directory / "config.json")
        model_type = config.get("model_type")
        if model_type != SUPPORTED_MODEL_TYPE:
            raise ConvertError(f"{directory.name} is a {model_type!r} checkpoint; lva converts Llama 3.2 Vision "
                               f"(model_type 'mllama', e.g. meta-llama/Llama-3.2-11B-Vision-Instruct)")
        tokenizer = _read_json(directory / "tokenizer.json")
        tokenizer_config = _read_json(directory / "tokenizer_config.json")
        processor_config = _read_json(directory / "preprocessor_config.json")
        try:
            hparams = MllamaHParams(
                text=TextHParams.from_hf(config["text_config"]),
                vision=VisionHParams.from_hf(config["vision_config"]),
                preprocessing=ImagePreprocessing.from_hf(processor_config),
                image_token_id=int(config.get("image_token_index", config["text_config"]["vocab_size"])),
            )
        except (KeyError, TypeError, ValueError, HParamsError) as e:
            raise ConvertError(f"{directory.name}/config.json is not a usable mllama config: {_describe(e)}") from None
        _check_tile_size(processor_config, hparams.vision, directory)
        checkpoint = cls(
            directory=directory,
            config=config,
            hparams=hparams,
            tensors=_read_tensor_index(directory),
            tokenizer=tokenizer,
            tokenizer_config=tokenizer_config,
            chat_template=_read_chat_template(directory, tokenizer_config),
            license=_read_license(directory),
        )
        checkpoint._check_tensors()
        return checkpoint

    def entry(self, hf_name: str) -> TensorEntry:
        return self.tensors[hf_name]

    def expected_tensors(self) -> Iterator[str]:
        """Every HF tensor name the conversion reads."""
        text, vision = self.hparams.text, self.hparams.vision
        blocks: list[tuple[type, str, str]] = [(W.TextModel, "", "")]
        blocks += [(W.SelfAttentionLayer, *W.self_attention_prefixes(j, i))
                   for j, i in enumerate(text.self_attention_layers)]
        blocks += [(W.CrossAttentionLayer, *W.cross_attention_prefixes(i)) for i in text.cross_attention_layers]
        blocks += [(W.VisionEmbeddings, "", W.VISION_HF_PREFIX), (W.Projector, "", "")]
        blocks += [(W.VisionLayer, *W.vision_layer_prefixes(i)) for i in range(vision.num_hidden_layers)]
        blocks += [(W.GlobalVisionLayer, *W.global_vision_layer_prefixes(i)) for i in range(vision.num_global_layers)]
        for block, gguf_prefix, hf_prefix in blocks:
            for name in W.names(block, gguf_prefix, hf_prefix):
                if name.hf is not None:
                    yield name.hf

    def fingerprint(self) -> str:
        """An id shared by the two files of one conversion: config, tensor layout and every 1-D tensor.

        Deterministic, so converting the same checkpoint to another quant gives a pair that still
        matches; fine-tunes differ in their norms and gates, so they get another id.
        """
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self.tensors):
            entry = self.tensors[name]
            digest.update(f"{name}:{entry.dtype}:{entry.shape}".encode())
            if len(entry.shape) <= 1:
                with open(entry.path, "rb") as f:
                    f.seek(entry.offset)
                    digest.update(f.read(entry.nbytes))
        return digest.hexdigest()[:32]

    def _check_tensors(self) -> None:
        missing = [name for name in self.expected_tensors() if name not in self.tensors]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ConvertError(f"{self.directory.name} lacks tensor {missing[0]}{more}; is the download complete?")
        text = self.hparams.text
        embed = self.tensors[W.EMBED_TOKENS_HF]
        if embed.shape[0] <= self.hparams.image_token_id or embed.shape[0] < text.vocab_size:
            raise ConvertError(f"embed_tokens has {embed.shape[0]} rows; the config needs "
                               f"{max(text.vocab_size, self.hparams.image_token_id + 1)}")


def source_name(name: W.WeightName) -> str:
    """The checkpoint's name of a tensor the conversion reads (every one but rope_freqs, which it computes)."""
    if name.hf is None:
        raise KeyError(f"{name.gguf} is not read from the checkpoint")
    return name.hf


def _canonical(name: str) -> str:
    for alias, published in PREFIX_ALIASES:
        if name.startswith(alias):
            return published + name[len(alias):]
    return name


def _read_tensor_index(directory: Path) -> dict[str, TensorEntry]:
    """Headers of every shard, keyed by canonical HF name; the index (if any) must agree with them."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        weight_map = _read_json(index_path).get("weight_map", {})
        shard_names = sorted(set(weight_map.values()))
        for shard in shard_names:
            if not (directory / shard).is_file():
                raise ConvertError(f"missing shard {shard} (listed in {INDEX_FILE}) in {directory}")
    else:
        weight_map = None
        shard_names = sorted(p.name for p in directory.glob("*.safetensors"))
        if not shard_names:
            raise ConvertError(f"no .safetensors weights in {directory}")
    entries: dict[str, TensorEntry] = {}
    for shard in shard_names:
        for name, entry in read_header(directory / shard).items():
            entries[_canonical(name)] = entry
    if weight_map is not None:
        absent = [name for name in weight_map if _canonical(name) not in entries]
        if absent:
            raise ConvertError(f"{INDEX_FILE} lists {absent[0]} but no shard holds it; the checkpoint is corrupt")
    return entries


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path.parent.name} has no {path.name}; is this a Hugging Face checkpoint directory?")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path.name} is not valid JSON ({_describe(e)})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path.name} is not a JSON object")
    return value


def _read_chat_template(directory: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The template from tokenizer_config.json, or the separate files newer checkpoints use."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):      # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template:
        return template
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "chat_template.json").is_file():
        return _read_json(directory / "chat_template.json").get("chat_template")
    return None


def _read_license(directory: Path) -> str | None:
    """The `license:` of the model card's front matter, as published on the Hub."""
    card = directory / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip() or None
    return None


def _check_tile_size(processor_config: dict[str, Any], vision: VisionHParams, directory: Path) -> None:
    size = processor_config.get("size", {})
    tile = size.get("height", vision.image_size) if isinstance(size, dict) else vision.image_size
    if tile != vision.image_size or size.get("width", tile) != tile:
        raise ConvertError(f"{directory.name}/preprocessor_config.json tiles are {size}, "
                           f"but the vision model takes {vision.image_size}x{vision.image_size}")
    max_tiles = processor_config.get("max_image_tiles", vision.max_num_tiles)
    if max_tiles != vision.max_num_tiles:
        raise ConvertError(f"{directory.name}/preprocessor_config.json allows {max_tiles} tiles, "
                           f"the vision model {vision.max_num_tiles}")


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing {error.args[0]!r}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__
