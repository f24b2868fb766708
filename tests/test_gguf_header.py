"""The header reader agrees with gguf-py on the files our converter writes, vocabulary and all."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from convert.pipeline import convert
from models.gguf_header import HeaderError, read_header


def test_scalar_metadata_and_tensor_table_equal_gguf_py_s(checkpoint_256: Path, tmp_path: Path) -> None:
    pair = convert(str(checkpoint_256), tmp_path, quant="Q4_K_M", progress=False)
    for path in (pair.text, pair.vision):
        reader = gguf.GGUFReader(path)
        scalars = {key: field.contents() for key, field in reader.fields.items()
                   if not key.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY}
        header = read_header(path)
        assert header.metadata == scalars
        assert {type(v) for v in header.metadata.values()} <= {str, int, float, bool}
        assert header.tensors == [(t.tensor_type, tuple(int(d) for d in t.shape)) for t in reader.tensors]
    arrays = [key for key, field in gguf.GGUFReader(pair.text).fields.items()
              if field.types[0] == gguf.GGUFValueType.ARRAY]
    assert "tokenizer.ggml.tokens" in arrays and not set(arrays) & set(read_header(pair.text).metadata)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a model at all, just some text",
                                     b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_a_file_that_is_not_a_gguf_is_a_header_error_naming_it(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(HeaderError, match="x.gguf is not a readable GGUF file"):
        read_header(path)
