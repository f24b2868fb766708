"""A GGUF file's type (F32, BF16, Q4_K_M...), named from the tensors it holds, never from `general.file_type`.

The key cannot be trusted: Ollama's converter writes 1 (F16) into every file it makes, whatever its
tensors are (since v0.11.1, BF16 text matrices from a BF16 checkpoint such as Meta's). So what a model
is named and described as, and what the runtime decides from it (an F32 KV cache for F32 weights), come
from the tensors. The rule is llama.cpp's for a file without the key (llama_model_loader: the type that
dominates, a k-quant named as its _M mix), weighed by the values each type holds in the file's matrices:
1-D tensors (norms, gates, RoPE factors) are F32 whatever the file's type.
"""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path
from typing import Iterable, Sequence

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType

from models.errors import LvaError
from models.gguf_header import HeaderError, read_header

# llama.cpp's names where a type's own name is not a file type: a k-quant names the mix its quantizer makes,
# MXFP4 the mixture-of-experts files it is made for.
MIXES = {T.F32: LlamaFileType.ALL_F32, T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
         T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M, T.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE}


class FileTypeError(LvaError):
    """A file whose tensor table cannot be read, or whose matrices are of a type llama.cpp names no file type for."""


def file_type_of(tensors: Iterable[tuple[T, Sequence[int]]]) -> LlamaFileType:
    """The file type of tensors given as (ggml type, shape): the type holding most of the matrices' values."""
    values: Counter[T] = Counter()
    for qtype, shape in tensors:
        if sum(d > 1 for d in shape) >= 2:
            values[T(qtype)] += prod(shape)
    if not values:
        raise FileTypeError("it holds no matrices")
    dominant = max(values, key=lambda qtype: (values[qtype], -qtype))
    if dominant in MIXES:
        return MIXES[dominant]
    try:
        return LlamaFileType[f"MOSTLY_{dominant.name}"]
    except KeyError:
        raise FileTypeError(f"its matrices are {dominant.name}, which llama.cpp names no file type for") from None


def quant_name(file_type: LlamaFileType) -> str:
    """As lva names quants (and files): MOSTLY_Q4_K_M -> Q4_K_M, ALL_F32 -> F32."""
    return file_type.name.split("_", 1)[1]


def read_file_type(path: Path) -> LlamaFileType:
    """The file type of a GGUF file on disk, from its header alone; raises FileTypeError for a file that is not
    a readable GGUF."""
    try:
        return file_type_of(read_header(path).tensors)
    except HeaderError as e:
        raise FileTypeError(str(e)) from None
    except FileTypeError as e:
        raise FileTypeError(f"{path.name}: {e}") from None
