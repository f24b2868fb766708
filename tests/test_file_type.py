"""A GGUF file's type comes from its tensors, named as llama.cpp names its file types and mixes."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from convert.pipeline import convert
from convert.quant_types import QUANT_TYPES
from models.file_type import FileTypeError, file_type_of, quant_name, read_file_type


@pytest.mark.parametrize("quant", list(QUANT_TYPES))
def test_every_lva_convert_type_is_named_from_its_tensors_as_llama_cpp_marked_it(quant: str, checkpoint_256: Path,
                                                                                tmp_path: Path) -> None:
    """llama.cpp's quantizer writes general.file_type truthfully: the tensors must say the same, mixes included."""
    pair = convert(str(checkpoint_256), tmp_path, quant=quant, progress=False)
    assert read_file_type(pair.text) == QUANT_TYPES[quant].llama_ftype
    assert quant_name(read_file_type(pair.text)) == quant


def test_the_values_in_matrices_decide_and_vectors_do_not_count() -> None:
    norms = [(T.F32, (64,))] * 100                                  # many, but 1-D: F32 in every file type
    assert file_type_of(norms + [(T.BF16, (64, 64))]) == F.MOSTLY_BF16
    assert file_type_of([(T.Q4_K, (256, 64))] * 3 + [(T.Q6_K, (256, 64))] * 2) == F.MOSTLY_Q4_K_M
    assert file_type_of([(T.Q4_K, (256, 64))] + [(T.Q6_K, (256, 512))]) == F.MOSTLY_Q6_K
    assert file_type_of([(T.F32, (64, 64, 1))]) == F.ALL_F32                  # a trailing 1 is still a matrix
    with pytest.raises(FileTypeError):
        file_type_of(norms)


def test_a_file_that_is_not_a_gguf_is_a_file_type_error(tmp_path: Path) -> None:
    for content in (b"", b"GGUF", b"not a model at all, just some text"):
        path = tmp_path / "x.gguf"
        path.write_bytes(content)
        with pytest.raises(FileTypeError, match="x.gguf"):
            read_file_type(path)
