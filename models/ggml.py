"""A typed ctypes binding to the ggml that llama-cpp-python ships, limited to what lva uses.

ggml has no stable ABI: struct layouts and signatures move between releases, so the binding is only
trusted with the exact llama-cpp-python it was written against. Importing this module checks that.

Four parts: quantization (the converter), graph building (`Graph`: a ggml context whose methods are
the ops, returning tensor pointers), devices (`Device`: what ggml sees, the registered backends), and
backends (`Backend`: a device's stream, where weights live and graphs run).
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p
from dataclasses import dataclass
from typing import Any, Sequence, cast

import numpy as np
from gguf import GGMLQuantizationType

import llama_cpp

from models.errors import LvaError

PINNED_LLAMA_CPP_PYTHON = "0.3.36"


class LlamaCppVersionError(LvaError):
    """The installed llama-cpp-python is not the one the ggml binding was written for."""


if llama_cpp.__version__ != PINNED_LLAMA_CPP_PYTHON:
    raise LlamaCppVersionError(
        f"lva needs llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON} (found {llama_cpp.__version__}); "
        f"reinstall with: pip install 'llama-cpp-python=={PINNED_LLAMA_CPP_PYTHON}'"
    )

from llama_cpp._ggml import libggml as _lib  # noqa: E402  (after the version check, on purpose)

Tensor = int                      # a `struct ggml_tensor *`, as ctypes hands it back
F32, F16, BF16, I32 = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                      GGMLQuantizationType.I32)

MAX_DIMS, MAX_SRC, MAX_OP_PARAMS, MAX_NAME = 4, 10, 64, 64


class TensorStruct(ctypes.Structure):
    """`struct ggml_tensor` (ggml.h); read for shapes, strides and names."""

    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * MAX_DIMS),
        ("nb", c_size_t * MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", ctypes.c_char * MAX_NAME),
        ("extra", c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class DevCaps(ctypes.Structure):
    _fields_ = [("async_", c_bool), ("host_buffer", c_bool), ("buffer_from_host_ptr", c_bool),
                ("events", c_bool), ("mmap_support", c_bool)]


class DevProps(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("description", c_char_p), ("memory_free", c_size_t),
                ("memory_total", c_size_t), ("type", c_int), ("device_id", c_char_p), ("caps", DevCaps)]


DEVICE_CPU, DEVICE_GPU, DEVICE_IGPU, DEVICE_ACCEL = 0, 1, 2, 3
DEVICE_KINDS = {DEVICE_CPU: "CPU", DEVICE_GPU: "GPU", DEVICE_IGPU: "integrated GPU", DEVICE_ACCEL: "accelerator"}
T = c_void_p


def _sig(name: str, restype, *argtypes) -> None:
    fn = getattr(_lib, name)
    fn.restype, fn.argtypes = restype, list(argtypes)


for _name, _res, _args in [
    # quantization
    ("ggml_quantize_chunk", c_size_t, [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p]),
    ("ggml_row_size", c_size_t, [c_int, c_int64]),
    ("ggml_blck_size", c_int64, [c_int]),
    ("ggml_quantize_requires_imatrix", c_bool, [c_int]),
    # contexts, tensors, graphs
    ("ggml_init", c_void_p, [InitParams]),
    ("ggml_free", None, [c_void_p]),
    ("ggml_tensor_overhead", c_size_t, []),
    ("ggml_graph_overhead_custom", c_size_t, [c_size_t, c_bool]),
    ("ggml_new_graph_custom", c_void_p, [c_void_p, c_size_t, c_bool]),
    ("ggml_build_forward_expand", None, [c_void_p, T]),
    ("ggml_graph_n_nodes", c_int, [c_void_p]),
    ("ggml_graph_node", T, [c_void_p, c_int]),
    ("ggml_op_desc", c_char_p, [T]),
    ("ggml_new_tensor", T, [c_void_p, c_int, c_int, POINTER(c_int64)]),
    ("ggml_set_name", T, [T, c_char_p]),
    ("ggml_get_name", c_char_p, [T]),
    ("ggml_set_input", None, [T]),
    ("ggml_set_output", None, [T]),
    ("ggml_nbytes", c_size_t, [T]),
    ("ggml_nelements", c_int64, [T]),
    ("ggml_is_contiguous", c_bool, [T]),
    ("ggml_n_dims", c_int, [T]),
    # ops
    ("ggml_add", T, [c_void_p, T, T]),
    ("ggml_mul", T, [c_void_p, T, T]),
    ("ggml_scale", T, [c_void_p, T, c_float]),
    ("ggml_mul_mat", T, [c_void_p, T, T]),
    ("ggml_norm", T, [c_void_p, T, c_float]),
    ("ggml_rms_norm", T, [c_void_p, T, c_float]),
    ("ggml_gelu_erf", T, [c_void_p, T]),
    ("ggml_gelu", T, [c_void_p, T]),
    ("ggml_silu", T, [c_void_p, T]),
    ("ggml_soft_max_ext", T, [c_void_p, T, T, c_float, c_float]),
    ("ggml_flash_attn_ext", T, [c_void_p, T, T, T, T, c_float, c_float, c_float]),
    ("ggml_concat", T, [c_void_p, T, T, c_int]),
    ("ggml_repeat_4d", T, [c_void_p, T, c_int64, c_int64, c_int64, c_int64]),
    ("ggml_pad", T, [c_void_p, T, c_int, c_int, c_int, c_int]),
    ("ggml_get_rows", T, [c_void_p, T, T]),
    ("ggml_cpy", T, [c_void_p, T, T]),
    ("ggml_cast", T, [c_void_p, T, c_int]),
    ("ggml_cont", T, [c_void_p, T]),
    ("ggml_permute", T, [c_void_p, T, c_int, c_int, c_int, c_int]),
    ("ggml_reshape_4d", T, [c_void_p, T, c_int64, c_int64, c_int64, c_int64]),
    ("ggml_view_4d", T, [c_void_p, T, c_int64, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t, c_size_t]),
    ("ggml_custom_4d", T, [c_void_p, c_int, c_int64, c_int64, c_int64, c_int64, POINTER(c_void_p), c_int, c_void_p,
                           c_int, c_void_p]),
    # devices and their registries
    ("ggml_backend_reg_count", c_size_t, []),
    ("ggml_backend_reg_get", c_void_p, [c_size_t]),
    ("ggml_backend_reg_name", c_char_p, [c_void_p]),
    ("ggml_backend_reg_by_name", c_void_p, [c_char_p]),
    ("ggml_backend_reg_dev_count", c_size_t, [c_void_p]),
    ("ggml_backend_reg_dev_get", c_void_p, [c_void_p, c_size_t]),
    ("ggml_backend_register", None, [c_void_p]),
    ("ggml_backend_dev_count", c_size_t, []),
    ("ggml_backend_dev_get", c_void_p, [c_size_t]),
    ("ggml_backend_dev_by_name", c_void_p, [c_char_p]),
    ("ggml_backend_dev_get_props", None, [c_void_p, POINTER(DevProps)]),
    ("ggml_backend_dev_supports_op", c_bool, [c_void_p, T]),
    ("ggml_backend_buffer_get_type", c_void_p, [c_void_p]),
    ("ggml_backend_buffer_is_host", c_bool, [c_void_p]),
    ("ggml_backend_buft_get_device", c_void_p, [c_void_p]),
    # backends
    ("ggml_backend_dev_init", c_void_p, [c_void_p, c_char_p]),
    ("ggml_backend_dev_backend_reg", c_void_p, [c_void_p]),
    ("ggml_backend_dev_buffer_from_host_ptr", c_void_p, [c_void_p, c_void_p, c_size_t, c_size_t]),
    ("ggml_backend_reg_get_proc_address", c_void_p, [c_void_p, c_char_p]),
    ("ggml_backend_free", None, [c_void_p]),
    ("ggml_backend_get_default_buffer_type", c_void_p, [c_void_p]),
    ("ggml_backend_alloc_ctx_tensors", c_void_p, [c_void_p, c_void_p]),
    ("ggml_backend_alloc_ctx_tensors_from_buft", c_void_p, [c_void_p, c_void_p]),
    ("ggml_backend_buft_name", c_char_p, [c_void_p]),
    ("ggml_backend_buffer_free", None, [c_void_p]),
    ("ggml_backend_buffer_get_size", c_size_t, [c_void_p]),
    ("ggml_backend_tensor_alloc", c_int, [c_void_p, T, c_void_p]),
    ("ggml_backend_tensor_set", None, [T, c_void_p, c_size_t, c_size_t]),
    ("ggml_backend_tensor_get", None, [T, c_void_p, c_size_t, c_size_t]),
    ("ggml_backend_tensor_copy", None, [T, T]),
    ("ggml_backend_graph_compute", c_int, [c_void_p, c_void_p]),
    ("ggml_gallocr_new", c_void_p, [c_void_p]),
    ("ggml_gallocr_free", None, [c_void_p]),
    ("ggml_gallocr_alloc_graph", c_bool, [c_void_p, c_void_p]),
]:
    _sig(_name, _res, *cast("list[Any]", _args))

_SET_N_THREADS = ctypes.CFUNCTYPE(None, c_void_p, c_int)


class Feature(ctypes.Structure):
    _fields_ = [("name", c_char_p), ("value", c_char_p)]


_GET_FEATURES = ctypes.CFUNCTYPE(POINTER(Feature), c_void_p)
_GET_EXTRA_BUFTS = ctypes.CFUNCTYPE(POINTER(c_void_p), c_void_p)


# ---------------------------------------------------------------------------------------------- quantization


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per quantization block; a row must be a multiple of it."""
    return int(_lib.ggml_blck_size(int(qtype)))


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    return int(_lib.ggml_row_size(int(qtype), n_per_row))


def quantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a 2-D float32 array row by row with ggml's own reference quantizer.

    Returns the raw bytes as uint8 [n_rows, row_bytes], the layout ggml and GGUF store.
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = rows.shape
    if n_per_row % block_size(qtype):
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block_size(qtype)} (got {n_per_row})")
    if _lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix")
    out = np.empty((n_rows, row_bytes(qtype, n_per_row)), dtype=np.uint8)
    written = _lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, None)
    assert written == out.nbytes, (written, out.nbytes)
    return out


# ---------------------------------------------------------------------------------------------- tensors


def struct(t: Tensor) -> TensorStruct:
    return TensorStruct.from_address(t)


def shape(t: Tensor) -> tuple[int, int, int, int]:
    """ggml order: ne[0] is the contiguous (fastest) dimension."""
    ne = struct(t).ne
    return ne[0], ne[1], ne[2], ne[3]


def is_contiguous(t: Tensor) -> bool:
    return _lib.ggml_is_contiguous(t)


def name_of(t: Tensor) -> bytes:
    return struct(t).name


def tensor_set(t: Tensor, array: np.ndarray) -> None:
    """Copy a C-contiguous array into a backend tensor of the same byte size."""
    array = np.ascontiguousarray(array)
    if array.nbytes != _lib.ggml_nbytes(t):
        raise ValueError(f"size mismatch setting {name_of(t)!r}: {array.nbytes} vs {_lib.ggml_nbytes(t)} bytes")
    _lib.ggml_backend_tensor_set(t, array.ctypes.data, 0, array.nbytes)


def read_rows(t: Tensor, out: np.ndarray, offset: int = 0) -> None:
    """Fill `out` with `out.nbytes` bytes of a backend tensor, starting `offset` bytes in."""
    _lib.ggml_backend_tensor_get(t, out.ctypes.data, offset, out.nbytes)


def write_rows(t: Tensor, data: np.ndarray, offset: int = 0) -> None:
    """Overwrite `data.nbytes` bytes of a backend tensor, starting `offset` bytes in."""
    data = np.ascontiguousarray(data)
    _lib.ggml_backend_tensor_set(t, data.ctypes.data, offset, data.nbytes)


def copy_tensor(src: Tensor, dst: Tensor) -> None:
    """Copy a tensor into one of the same layout on any device (through the host when they differ)."""
    _lib.ggml_backend_tensor_copy(src, dst)


def tensor_get(t: Tensor, dtype=np.float32) -> np.ndarray:
    """A backend tensor's contents as a numpy array in numpy order (reversed ggml `ne`)."""
    ne = list(reversed(shape(t)[: _lib.ggml_n_dims(t)]))
    out = np.empty(ne, dtype=dtype)
    if out.nbytes != _lib.ggml_nbytes(t):
        raise ValueError(f"{name_of(t)!r} is not a contiguous {np.dtype(dtype).name} tensor")
    _lib.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
    return out


# ---------------------------------------------------------------------------------------------- graphs


class Graph:
    """A ggml context (metadata only) plus a compute graph; its methods are the ops, named as in ggml.

    Tensors are plain pointers. Shapes are written in ggml order, contiguous dimension first.
    """

    def __init__(self, max_nodes: int = 8192) -> None:
        size = _lib.ggml_tensor_overhead() * max_nodes + _lib.ggml_graph_overhead_custom(max_nodes, False)
        self.ctx = _lib.ggml_init(InitParams(size, None, True))
        if not self.ctx:
            raise MemoryError("ggml_init failed")
        self.graph = _lib.ggml_new_graph_custom(self.ctx, max_nodes, False)
        self._kept: list[object] = []          # ctypes objects the graph's custom ops point to
        self.checked_on: int | None = None           # the backend whose ops this graph was checked against

    def close(self) -> None:
        if self.ctx:
            _lib.ggml_free(self.ctx)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

    def new(self, qtype: GGMLQuantizationType, *ne: int, name: str | None = None) -> Tensor:
        dims = (c_int64 * len(ne))(*ne)
        t = _lib.ggml_new_tensor(self.ctx, int(qtype), len(ne), dims)
        if name:
            _lib.ggml_set_name(t, name.encode())
        return t

    def input(self, qtype: GGMLQuantizationType, *ne: int, name: str) -> Tensor:
        t = self.new(qtype, *ne, name=name)
        _lib.ggml_set_input(t)
        return t

    def output(self, t: Tensor) -> Tensor:
        _lib.ggml_set_output(t)
        self.expand(t)
        return t

    def expand(self, t: Tensor) -> None:
        _lib.ggml_build_forward_expand(self.graph, t)

    @property
    def n_nodes(self) -> int:
        return _lib.ggml_graph_n_nodes(self.graph)

    # arithmetic
    def add(self, a: Tensor, b: Tensor) -> Tensor: return _lib.ggml_add(self.ctx, a, b)
    def mul(self, a: Tensor, b: Tensor) -> Tensor: return _lib.ggml_mul(self.ctx, a, b)
    def scale(self, a: Tensor, s: float) -> Tensor: return _lib.ggml_scale(self.ctx, a, s)
    def mul_mat(self, w: Tensor, x: Tensor) -> Tensor: return _lib.ggml_mul_mat(self.ctx, w, x)
    def gelu(self, a: Tensor) -> Tensor: return _lib.ggml_gelu_erf(self.ctx, a)
    def gelu_tanh(self, a: Tensor) -> Tensor: return _lib.ggml_gelu(self.ctx, a)     # an F16 table on the CPU
    def silu(self, a: Tensor) -> Tensor: return _lib.ggml_silu(self.ctx, a)

    def layer_norm(self, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return self.add(self.mul(_lib.ggml_norm(self.ctx, x, eps), weight), bias)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self.mul(_lib.ggml_rms_norm(self.ctx, x, eps), weight)

    def soft_max(self, a: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return _lib.ggml_soft_max_ext(self.ctx, a, mask, scale, 0.0)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        return _lib.ggml_flash_attn_ext(self.ctx, q, k, v, mask, scale, 0.0, 0.0)

    def custom(self, qtype: GGMLQuantizationType, ne: Sequence[int], sources: Sequence[Tensor], function: int,
               userdata: ctypes.Structure | ctypes.c_int32) -> Tensor:
        """A node computed by a C function of ours, `void f(struct ggml_tensor * dst, int ith, int nth, void *
        userdata)`, called by every CPU graph thread. The function must be a symbol of a compiled library (a
        Python callback would serialise the threads on the GIL); `userdata` lives as long as the graph."""
        self._kept.append(userdata)
        args = (c_void_p * len(sources))(*sources)
        full = (*ne, 1, 1, 1)[:4]
        return _lib.ggml_custom_4d(self.ctx, int(qtype), *full, args, len(sources), function, -1,
                                   ctypes.addressof(userdata))

    # layout
    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor: return _lib.ggml_concat(self.ctx, a, b, dim)
    def get_rows(self, table: Tensor, ids: Tensor) -> Tensor: return _lib.ggml_get_rows(self.ctx, table, ids)
    def cpy(self, src: Tensor, dst: Tensor) -> Tensor: return _lib.ggml_cpy(self.ctx, src, dst)
    def cont(self, a: Tensor) -> Tensor: return _lib.ggml_cont(self.ctx, a)

    def cast(self, a: Tensor, qtype: GGMLQuantizationType) -> Tensor:
        return a if struct(a).type == int(qtype) else _lib.ggml_cast(self.ctx, a, int(qtype))

    def pad(self, a: Tensor, p0: int = 0, p1: int = 0, p2: int = 0, p3: int = 0) -> Tensor:
        return _lib.ggml_pad(self.ctx, a, p0, p1, p2, p3)

    def repeat(self, a: Tensor, *ne: int) -> Tensor:
        full = (*ne, 1, 1, 1)[:4]
        return _lib.ggml_repeat_4d(self.ctx, a, *full)

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        return _lib.ggml_permute(self.ctx, a, *(*axes, 3)[:4])

    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        full = (*ne, 1, 1, 1)[:4]
        return _lib.ggml_reshape_4d(self.ctx, a, *full)

    def view(self, a: Tensor, ne: Sequence[int], offset: int = 0) -> Tensor:
        """A view with `a`'s own strides over the leading `ne` elements of each dimension."""
        full = (*ne, 1, 1, 1)[:4]
        nb = struct(a).nb
        return _lib.ggml_view_4d(self.ctx, a, *full, nb[1], nb[2], nb[3], offset)


# ---------------------------------------------------------------------------------------------- backends


class DeviceError(LvaError):
    """A device cannot do what lva asks of it (out of memory, an op it lacks); the message is one line."""


@dataclass(frozen=True)
class Device:
    """A device ggml sees: the CPU, a GPU, or a device of a ggml RPC server."""

    handle: int
    name: str                        # ggml's name: CPU, CUDA0, Metal, Vulkan0, RPC0, ...
    description: str                 # the card's name; for an RPC device, its server's HOST:PORT
    kind: int                        # DEVICE_CPU, DEVICE_GPU, ...
    backend: str                     # the registry it comes from: CPU, CUDA, Metal, Vulkan, RPC, ...
    maps_host_memory: bool           # reads host memory in place (the CPU, Apple's unified memory)
    device_id: str | None            # the PCI bus id, when known: one card seen by two backends has one

    @classmethod
    def from_handle(cls, handle: int) -> Device:
        props = DevProps()
        _lib.ggml_backend_dev_get_props(handle, ctypes.byref(props))
        return cls(handle, props.name.decode(), (props.description or b"").decode(), props.type,
                   _lib.ggml_backend_reg_name(_lib.ggml_backend_dev_backend_reg(handle)).decode(),
                   bool(props.caps.buffer_from_host_ptr), props.device_id.decode() if props.device_id else None)

    @property
    def is_cpu(self) -> bool:
        return self.kind == DEVICE_CPU

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes now; an RPC device asks its server."""
        props = DevProps()
        _lib.ggml_backend_dev_get_props(self.handle, ctypes.byref(props))
        return props.memory_free, props.memory_total


def devices() -> list[Device]:
    """Every device ggml has registered, in its order (RPC servers appear once added)."""
    return [Device.from_handle(_lib.ggml_backend_dev_get(i)) for i in range(_lib.ggml_backend_dev_count())]


def device_named(name: str) -> Device | None:
    handle = _lib.ggml_backend_dev_by_name(name.encode())
    return Device.from_handle(handle) if handle else None


def cpu_device() -> Device:
    return next(d for d in devices() if d.is_cpu)


def first_gpu_or_cpu() -> Device:
    """The device a single-device caller (the benchmarks) uses: the first GPU, else the CPU."""
    every = devices()
    return next((d for d in every if d.kind in (DEVICE_GPU, DEVICE_IGPU)), None) or next(d for d in every if d.is_cpu)


def backend_registries() -> list[str]:
    """The backends this build of ggml has (CPU, CUDA, Metal, Vulkan, RPC, ...), as ggml names them."""
    return [_lib.ggml_backend_reg_name(_lib.ggml_backend_reg_get(i)).decode()
            for i in range(_lib.ggml_backend_reg_count())]


def device_of(t: Tensor) -> Device | None:
    """The device whose memory holds a tensor (None before it has memory)."""
    buffer = struct(t).buffer
    if not buffer:
        return None
    handle = _lib.ggml_backend_buft_get_device(_lib.ggml_backend_buffer_get_type(buffer))
    if not handle and _lib.ggml_backend_buffer_is_host(buffer):
        return cpu_device()                  # the CPU's buffer over a mapped file names no device
    return Device.from_handle(handle) if handle else None


class Backend:
    """A device's backend: its memory holds weights and activations, its stream runs graphs."""

    def __init__(self, n_threads: int, device: Device | None = None) -> None:
        self.device = device or first_gpu_or_cpu()
        self.name = self.device.name
        self.description = self.device.description
        self.is_cpu = self.device.is_cpu
        self.maps_host_memory = self.device.maps_host_memory
        self.handle = _lib.ggml_backend_dev_init(self.device.handle, None)
        if not self.handle:
            raise DeviceError(f"could not start the ggml backend {self.name}")
        self.set_n_threads(n_threads)

    def set_n_threads(self, n_threads: int) -> None:
        reg = _lib.ggml_backend_dev_backend_reg(self.device.handle)
        address = _lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
        if address:
            _SET_N_THREADS(address)(self.handle, n_threads)

    def close(self) -> None:
        if self.handle:
            _lib.ggml_backend_free(self.handle)
            self.handle = None

    def alloc(self, graph: Graph) -> int:
        """Give every tensor of a graph's context memory on this backend; returns the buffer."""
        buffer = _lib.ggml_backend_alloc_ctx_tensors(graph.ctx, self.handle)
        if not buffer:
            raise DeviceError(f"out of memory on {self.name}")
        return buffer

    def alloc_in(self, graph: Graph, buffer_type: int) -> int:
        buffer = _lib.ggml_backend_alloc_ctx_tensors_from_buft(graph.ctx, buffer_type)
        if not buffer:
            raise DeviceError(f"out of memory on {self.name}")
        return buffer

    def repack_buffer_type(self) -> int | None:
        """The CPU's CPU_REPACK buffer type: quantized matrices stored there are rearranged for the CPU's
        SIMD kernels (llama.cpp keeps its own CPU weights there), or None where there is none."""
        reg = _lib.ggml_backend_dev_backend_reg(self.device.handle)
        address = _lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not self.is_cpu or not address:
            return None
        types = _GET_EXTRA_BUFTS(address)(self.device.handle)
        i = 0
        while types and types[i]:
            if _lib.ggml_backend_buft_name(types[i]) == b"CPU_REPACK":
                return types[i]
            i += 1
        return None

    def check_ops(self, graph: Graph) -> None:
        """Refuse, in one line, a graph with an op this device lacks (the CPU has them all)."""
        if self.is_cpu:
            return
        for i in range(graph.n_nodes):
            node = _lib.ggml_graph_node(graph.graph, i)
            op = _lib.ggml_op_desc(node).decode()
            # A custom op is a function pointer into this process's CPU code: no other device can run it
            # (an RPC device would say it can, and crash its server).
            if "CUSTOM" in op or not _lib.ggml_backend_dev_supports_op(self.device.handle, node):
                raise DeviceError(f"the ggml op {op} is not supported on {self.name} ({self.description}); "
                                  f"run on the CPU with --gpu-layers 0")

    def map_host(self, address: int, size: int) -> int | None:
        """A buffer over host memory (an mmap'd file), when the device can read it in place."""
        if not self.maps_host_memory:
            return None
        return _lib.ggml_backend_dev_buffer_from_host_ptr(self.device.handle, address, size, size) or None


def cpu_features() -> dict[str, str]:
    """What ggml's CPU backend was built to use (AVX2, AVX512_BF16, ...): its kernels use these and no others."""
    cpu = cpu_device().handle
    reg = _lib.ggml_backend_dev_backend_reg(cpu)
    address = _lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not address:
        return {}
    features, found = _GET_FEATURES(address)(reg), {}
    i = 0
    while features[i].name:
        found[features[i].name.decode()] = features[i].value.decode()
        i += 1
    return found


def free_buffer(buffer: int | None) -> None:
    if buffer:
        _lib.ggml_backend_buffer_free(buffer)


def place(buffer: int, t: Tensor, address: int) -> None:
    """Point a tensor at `address` inside a buffer made by `Backend.map_host`."""
    if _lib.ggml_backend_tensor_alloc(buffer, t, address) != 0:
        raise RuntimeError(f"could not place {name_of(t)!r} in its mapped buffer")


class Memory:
    """Tensors with memory of their own: a ggml context describing them and the backend buffer holding
    them, freed together by `close` (or at the end of a `with` block). Describe the tensors with `new`,
    then give them memory with `allocate` (or `adopt` a buffer they were placed in)."""

    def __init__(self, max_tensors: int) -> None:
        self.graph = Graph(max_tensors + 1)
        self.buffer: int | None = None

    def new(self, qtype: GGMLQuantizationType, *ne: int, name: str | None = None) -> Tensor:
        return self.graph.new(qtype, *ne, name=name)

    def allocate(self, backend: Backend, buffer_type: int | None = None) -> Memory:
        """Every tensor described so far gets memory on the backend (in `buffer_type`, if given)."""
        self.buffer = backend.alloc(self.graph) if buffer_type is None else backend.alloc_in(self.graph, buffer_type)
        return self

    def adopt(self, buffer: int) -> None:
        """Own a buffer the tensors were placed in by hand (`place`)."""
        self.buffer = buffer

    def close(self) -> None:
        free_buffer(self.buffer)
        self.buffer = None
        self.graph.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def converted(backend: Backend, scratch: Scratch, tensors: Sequence[Tensor],
              qtype: GGMLQuantizationType) -> tuple[Memory, list[Tensor]]:
    """Copies of `tensors` in `qtype` in new memory on the backend, converted by ggml's own copy op.

    Returns the copies' memory (the caller closes it) and the copies, in order."""
    memory = Memory(len(tensors))
    copies = [memory.new(qtype, *shape(t)[:_lib.ggml_n_dims(t)], name=name_of(t).decode()) for t in tensors]
    memory.allocate(backend)
    work = Graph(2 * len(tensors) + 8)
    try:
        for t, copy in zip(tensors, copies):
            work.expand(work.cpy(t, copy))
        scratch.run(work)
    except BaseException:
        memory.close()
        raise
    finally:
        work.close()
    return memory, copies


class Scratch:
    """Scratch memory for running graphs on a backend, reused from one graph to the next (grows as needed).

    Inputs are set after the graph is placed in the scratch memory, so `run` takes them.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.allocator = _lib.ggml_gallocr_new(_lib.ggml_backend_get_default_buffer_type(backend.handle))

    def run(self, graph: Graph, inputs: dict[Tensor, np.ndarray] | None = None) -> None:
        if graph.checked_on != self.backend.handle:
            self.backend.check_ops(graph)
            graph.checked_on = self.backend.handle
        if not _lib.ggml_gallocr_alloc_graph(self.allocator, graph.graph):
            raise DeviceError(f"out of memory on {self.backend.name} for a graph of {graph.n_nodes} nodes")
        for t, array in (inputs or {}).items():
            if struct(t).buffer:                   # an input the graph does not use gets no memory
                tensor_set(t, array)
        status = _lib.ggml_backend_graph_compute(self.backend.handle, graph.graph)
        if status != 0:
            raise RuntimeError(f"ggml graph computation failed (status {status})")

    def close(self) -> None:
        if self.allocator:
            _lib.ggml_gallocr_free(self.allocator)
            self.allocator = None

    def __del__(self) -> None:
        self.close()
