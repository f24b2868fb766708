"""Every --quant runs end to end: convert, load in stock llama-cpp-python, generate; types and sizes as promised."""

from __future__ import annotations

from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from convert.pipeline import convert
from convert.quant_types import QUANT_TYPES, storage_type
from models import ggml
from models.mllama import gguf_keys as K

# What llama.cpp's mix puts in a self-attention matrix, per --quant (llama-quant.cpp).
TEXT_MATRIX_TYPE = {"F32": T.F32, "F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q6_K": T.Q6_K,
                    "Q5_K_M": T.Q5_K, "Q4_K_M": T.Q4_K}


def tensors_by_name(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def assert_sizes_match_types(tensors: dict[str, gguf.ReaderTensor]) -> None:
    for t in tensors.values():
        row_length = int(t.shape[0])
        n_rows = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else 1
        assert t.n_bytes == n_rows * ggml.row_bytes(t.tensor_type, row_length), t.name


def greedy_tokens(model: llama_cpp.Llama, prompt: bytes, n: int) -> list[int]:
    """Greedy decoding that ignores end-of-turn, so `n` tokens always come out."""
    model.reset()
    model.eval(model.tokenize(prompt, add_bos=True))
    out = []
    for _ in range(n):
        logits = model.scores[model.n_tokens - 1]
        assert np.all(np.isfinite(logits))
        out.append(int(np.argmax(logits)))
        model.eval([out[-1]])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("quant", list(QUANT_TYPES))
def test_every_quant_type_converts_loads_and_generates(quant: str, checkpoint_256: Path, tmp_path: Path) -> None:
    pair = convert(str(checkpoint_256), tmp_path, quant=quant, progress=False)
    assert pair.text.name == f"tiny-256-text-{quant}.gguf" and pair.vision.name == f"tiny-256-vision-{quant}.gguf"

    text = tensors_by_name(pair.text)
    assert text["blk.0.attn_q.weight"].tensor_type == TEXT_MATRIX_TYPE[quant]
    assert text["blk.0.attn_norm.weight"].tensor_type == T.F32
    assert text["token_embd.weight"].shape.tolist() == [256, 768]        # the text vocabulary only
    assert_sizes_match_types(text)

    vision = tensors_by_name(pair.vision)
    expected_cross = QUANT_TYPES[quant].cross_attention
    expected_encoder = T.F32 if quant == "F32" else T.F16
    assert vision["cross.blk.1.attn_q.weight"].tensor_type == expected_cross
    assert vision["cross.blk.1.ffn_down.weight"].tensor_type == expected_cross
    assert vision["cross.blk.1.attn_gate"].tensor_type == T.F32
    assert vision["v.blk.0.attn_q.weight"].tensor_type == expected_encoder
    assert vision["mm.weight"].tensor_type == expected_encoder
    assert vision["image_token_embd.weight"].shape.tolist() == [256]
    assert_sizes_match_types(vision)

    model = llama_cpp.Llama(str(pair.text), n_ctx=128, verbose=False, logits_all=True)
    assert len(greedy_tokens(model, b"Hello the world", 4)) == 4


def test_vision_quant_q8_0_quantizes_the_encoder_but_not_vectors(checkpoint_256: Path, tmp_path: Path) -> None:
    pair = convert(str(checkpoint_256), tmp_path, quant="Q4_K_M", vision_quant="Q8_0", progress=False)
    vision = tensors_by_name(pair.vision)
    assert vision["v.blk.0.attn_q.weight"].tensor_type == T.Q8_0
    assert vision["v.global.blk.0.ffn_up.weight"].tensor_type == T.Q8_0
    assert vision["v.blk.0.attn_norm.weight"].tensor_type == T.F32
    assert vision["v.patch_embd.weight"].tensor_type == T.F16          # ggml's im2col wants F16 kernels
    assert vision["cross.blk.1.attn_k.weight"].tensor_type == T.Q4_K


def test_the_two_files_share_a_pair_id_and_the_vision_file_names_its_text_file(checkpoint_256: Path,
                                                                               tmp_path: Path) -> None:
    pair = convert(str(checkpoint_256), tmp_path, quant="F16", progress=False)
    text_fields = gguf.GGUFReader(pair.text).fields
    vision_fields = gguf.GGUFReader(pair.vision).fields
    assert text_fields[K.PAIR_ID].contents() == vision_fields[K.PAIR_ID].contents()
    assert vision_fields[K.TEXT_FILE].contents() == pair.text.name
    assert vision_fields[K.CROSS_ATTENTION_LAYERS].contents() == [1]
    assert vision_fields[K.PREPROCESS_IMAGE_MEAN].contents() == pytest.approx([0.5, 0.45, 0.4])
    assert text_fields["general.license"].contents() == "llama3.2"
    assert text_fields["llama.block_count"].contents() == 3              # 4 layers, one of them cross


@pytest.mark.parametrize("wanted, row_length, stored", [
    (T.Q4_K, 256, T.Q4_K), (T.Q4_K, 96, T.Q5_0), (T.Q4_K, 80, T.F16), (T.Q5_K, 96, T.Q5_1),
    (T.Q6_K, 96, T.Q8_0), (T.Q6_K, 40, T.F16), (T.Q8_0, 40, T.F16), (T.F16, 7, T.F16),
])
def test_rows_that_do_not_fit_a_block_fall_back_as_llama_cpp_does(wanted: T, row_length: int, stored: T) -> None:
    assert storage_type(wanted, row_length) == stored
