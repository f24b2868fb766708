"""The cross-attention layers, injected into llama.cpp's decoder through its `cb_eval` callback.

llama.cpp names the residual stream after self-attention layer i `l_out-i` and the token embeddings
`embd`. Answering True when asked about such a node makes the scheduler compute up to it and call
back before any consumer runs; we read the rows, apply the cross layers that sit there, write them
back. The same call at `embd` also puts the `<|image|>` embedding in place: the text file keeps a
pure Llama vocabulary, so the image token goes to llama.cpp as a placeholder id.

Where: each point's layers run on their own backend (the device of the self layer they follow, see
placement.py); `l_out-i` may live on any device, so its rows go through the host both ways.

Which rows: llama.cpp splits a batch into ubatches in order, and the `embd` node of each ubatch has
its rows, so counting rows there tells every later node which positions it holds. The last layer
keeps only the rows that produce logits (llama.cpp's `inp_out_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from assistant.runtime.placement import self_layer_before
from models import ggml
from models.ggml import F32, Graph
from models.kernels.paths import GGML_CROSS_ATTENTION, KernelPath
from models.mllama.cross_attention import Gates, cross_attention_layer
from models.mllama.hparams import TextHParams
from models.mllama.image_kv import ImageKV
from models.mllama.weights import CrossAttentionLayer

EMBEDDINGS_NODE = b"embd"


def injection_points(cross_layers: list[int]) -> dict[bytes, list[int]]:
    """Node name -> the cross layers (stack indices, in order) that apply right after it.

    One that follows no self layer (stack index 0) acts on the token embeddings.
    """
    points: dict[bytes, list[int]] = {}
    for index, self_layer in sorted(self_layer_before(cross_layers).items()):
        node = EMBEDDINGS_NODE if self_layer < 0 else f"l_out-{self_layer}".encode()
        points.setdefault(node, []).append(index)
    return points


@dataclass
class Batch:
    """What one llama_decode call holds, for the hook to find its rows."""

    tokens: np.ndarray               # int32, the real ids (the image token included)
    positions: np.ndarray            # int32
    outputs: np.ndarray              # bool: rows that produce logits
    cursor: int = 0                  # rows of earlier ubatches
    rows: slice = field(default_factory=lambda: slice(0, 0))


class CrossAttentionHook:
    """Owns the callback handed to llama.cpp and the small graphs it runs per injection point."""

    def __init__(self, backends: dict[int, ggml.Backend], layers: dict[int, CrossAttentionLayer],
                 gates: dict[int, Gates], hp: TextHParams, image_token_embedding: np.ndarray, image_token_id: int,
                 n_self_layers: int, cpu_path: KernelPath) -> None:
        """`cpu_path`: how a decoded row's attention over the image runs where a point's layers are on the CPU."""
        self.layers, self.gates, self.hp = layers, gates, hp
        self.cpu_path = cpu_path
        self.points = injection_points(list(layers))
        self.backends = {name: backends[indices[0]] for name, indices in self.points.items()}
        self.scratches = {backend: ggml.Scratch(backend) for backend in dict.fromkeys(self.backends.values())}
        self.last_layer_node = f"l_out-{n_self_layers - 1}".encode()
        self.image_token_embedding = image_token_embedding
        self.image_token_id = image_token_id
        self.image: ImageKV | None = None
        self.image_start: int | None = None          # position of the first image token of the sequence
        self.batch: Batch | None = None
        self.active = False
        self.error: Exception | None = None
        self.decode_graphs: dict[bytes, tuple[Graph, int, int, ggml.Scratch]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def bind(self, image: ImageKV | None, image_start: int | None) -> None:
        """The image the sequence sees from `image_start` on (None: a text-only sequence)."""
        if image is not self.image:
            self._drop_graphs()
        self.image, self.image_start = image, image_start

    def prepare(self, batch: Batch) -> None:
        """Called before each llama_decode: rows before the first image token need nothing from us."""
        self.batch = batch
        self.active = (self.image is not None and self.image_start is not None
                       and int(batch.positions.max()) >= self.image_start)

    def _on_node(self, tensor: int, ask: bool, _user_data) -> bool:
        if not self.active:
            return not ask
        name = ggml.name_of(tensor)
        wanted = name == EMBEDDINGS_NODE or name in self.points
        if ask or not wanted:
            return wanted if ask else True
        try:
            self._apply(tensor, name)
        except Exception as exc:                     # an exception must not cross into C
            self.error = exc
            return False
        return True

    def _apply(self, tensor: int, name: bytes) -> None:
        batch, n_embd = self.batch, self.hp.hidden_size
        n_rows = ggml.shape(tensor)[1]
        if name == EMBEDDINGS_NODE:
            batch.rows = slice(batch.cursor, batch.cursor + n_rows)
            batch.cursor += n_rows
            rows = np.arange(batch.rows.start, batch.rows.stop)
        else:
            rows = np.arange(batch.rows.start, batch.rows.stop)
            if name == self.last_layer_node and n_rows != len(rows):
                rows = rows[batch.outputs[batch.rows]]
        if len(rows) != n_rows:
            raise RuntimeError(f"cross-attention hook lost track of rows at {name.decode()}")
        seeing = batch.positions[rows] >= self.image_start
        if not seeing.any():
            return
        if name not in self.points and not (batch.tokens[rows] == self.image_token_id).any():
            return                               # the embeddings, and no image token among them: nothing to do
        first = int(np.argmax(seeing))                # rows at or after the image start form a suffix
        x = np.empty((n_rows - first, n_embd), dtype=np.float32)
        row_bytes = n_embd * 4
        ggml.read_rows(tensor, x, first * row_bytes)
        if name == EMBEDDINGS_NODE:
            x[batch.tokens[rows[first:]] == self.image_token_id] = self.image_token_embedding
        if name in self.points:
            x = self._cross_layers(name, x)
        ggml.write_rows(tensor, x, first * row_bytes)

    def _cross_layers(self, name: bytes, x: np.ndarray) -> np.ndarray:
        """Run the layers at one point. The one-row graph of each point (decoding) is built once per image
        with its own scratch memory; other shapes are built, run and dropped (a graph keeps the addresses
        its scratch gave it, so graphs may share scratch memory only one at a time)."""
        if x.shape[0] == 1:
            if name not in self.decode_graphs:
                self.decode_graphs[name] = (*self._build(name, 1), ggml.Scratch(self.backends[name]))
            g, x_in, x_out, scratch = self.decode_graphs[name]
            scratch.run(g, {x_in: x})
            return ggml.tensor_get(x_out).reshape(x.shape)
        g, x_in, x_out = self._build(name, x.shape[0])
        try:
            self.scratches[self.backends[name]].run(g, {x_in: x})
            return ggml.tensor_get(x_out).reshape(x.shape)
        finally:
            g.close()

    def _build(self, name: bytes, n_rows: int) -> tuple[Graph, int, int]:
        g = Graph(64 * len(self.points[name]) + 8)
        x_in = g.input(F32, self.hp.hidden_size, n_rows, name="rows")
        x = x_in
        path = self.cpu_path if self.backends[name].is_cpu else GGML_CROSS_ATTENTION   # our kernels are CPU code
        for index in self.points[name]:
            x = cross_attention_layer(g, x, self.layers[index], self.gates[index],
                                      self.image.keys[index], self.image.values_t[index], self.hp, path)
        return g, x_in, g.output(g.cont(x) if x == x_in else x)

    def _drop_graphs(self) -> None:
        for g, _, _, scratch in self.decode_graphs.values():
            g.close()
            scratch.close()
        self.decode_graphs.clear()

    def close(self) -> None:
        self._drop_graphs()
        for scratch in self.scratches.values():
            scratch.close()
