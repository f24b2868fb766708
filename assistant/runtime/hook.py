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
from typing import Any, Callable

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
MAX_DECODE_ROWS = 16                 # graphs of up to this many rows are kept and reused: decoding
MAX_KEPT_GRAPHS = 64


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
    sequences: np.ndarray            # int32: the sequence of each row
    outputs: np.ndarray              # bool: rows that produce logits
    cursor: int = 0                  # rows of earlier ubatches
    rows: slice = field(default_factory=lambda: slice(0, 0))


@dataclass(frozen=True)
class Seen:
    """The image a sequence sees, from the position of its first image token on."""

    image: ImageKV
    start: int


@dataclass(frozen=True)
class Segment:
    """Consecutive rows of one sequence that see its image: rows first..first+count of those the point
    changes."""

    first: int
    count: int
    image: ImageKV | None            # None: rows that see no image


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
        self.seen: dict[int, Seen] = {}              # sequence -> the image it sees
        self.batch: Batch | None = None
        self.active = False
        self.error: Exception | None = None
        # Graphs of a few rows (decoding), kept per point and shape: built once, run every step.
        self.decode_graphs: dict[tuple, tuple[Graph, int, int, ggml.Scratch]] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self.on_node)

    def bind(self, sequence: int, image: ImageKV | None, image_start: int | None = None) -> None:
        """The image `sequence` sees from position `image_start` on (None: a text-only sequence)."""
        current = self.seen.get(sequence)
        if current is not None and (image is None or current.image is not image):
            self._drop_graphs()
        if image is None:
            self.seen.pop(sequence, None)
        elif image_start is None:
            raise ValueError("an image is seen from the position of its token: image_start is needed")
        else:
            self.seen[sequence] = Seen(image, image_start)

    @property
    def bound_images(self) -> list[ImageKV]:
        return [seen.image for seen in self.seen.values()]

    def prepare(self, batch: Batch) -> None:
        """Called before each llama_decode: rows before their sequence's first image token need nothing from us."""
        self.batch = batch
        self.active = bool(self._seeing(batch.sequences, batch.positions).any())

    def _seeing(self, sequences: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Whether each row sees an image: its sequence has one, and the row is at or after its start."""
        starts = np.array([self.seen[s].start if s in self.seen else np.iinfo(np.int32).max
                           for s in sequences.tolist()], dtype=np.int64)
        return positions >= starts

    def route_callback(self, on_node: Callable[[int, bool, Any], bool]) -> None:
        """Have llama.cpp call `on_node` in place of `self.on_node` (a benchmark wraps it to time it). A context
        takes the callback when it is created, so this serves only before the model's first context."""
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(on_node)

    def on_node(self, tensor: int, ask: bool, _user_data) -> bool:
        """llama.cpp's eval callback: asked which nodes we want, then handed each one once computed."""
        if not self.active:
            return not ask
        name = ggml.name_of(tensor)
        wanted = name == EMBEDDINGS_NODE or name in self.points
        if ask or not wanted:
            return wanted if ask else True
        try:
            self._apply(tensor, name)
        except Exception as exc:  # noqa: BLE001  (an exception must not cross into C: decode raises it after)
            self.error = exc
            return False
        return True

    def _apply(self, tensor: int, name: bytes) -> None:
        batch, n_embd = self._current(), self.hp.hidden_size
        n_rows = ggml.shape(tensor)[1]
        if name == EMBEDDINGS_NODE:
            batch.rows = slice(batch.cursor, batch.cursor + n_rows)
            batch.cursor += n_rows
        rows = np.arange(batch.rows.start, batch.rows.stop)
        if name == self.last_layer_node and n_rows != len(rows):
            rows = rows[batch.outputs[batch.rows]]
        if len(rows) != n_rows:
            raise RuntimeError(f"cross-attention hook lost track of rows at {name.decode()}")
        seeing = self._seeing(batch.sequences[rows], batch.positions[rows])
        if not seeing.any():
            return
        if name not in self.points and not (batch.tokens[rows] == self.image_token_id).any():
            return                               # the embeddings, and no image token among them: nothing to do
        first, last = int(np.argmax(seeing)), n_rows - int(np.argmax(seeing[::-1]))   # the rows that change
        x = np.empty((last - first, n_embd), dtype=np.float32)
        row_bytes = n_embd * 4
        ggml.read_rows(tensor, x, first * row_bytes)
        if name == EMBEDDINGS_NODE:
            x[batch.tokens[rows[first:last]] == self.image_token_id] = self.image_token_embedding
        if name in self.points:
            x = self._cross_layers(name, x, self._segments(rows[first:last], seeing[first:last]))
        ggml.write_rows(tensor, x, first * row_bytes)

    def _current(self) -> Batch:
        if self.batch is None:
            raise RuntimeError("the hook was called before prepare()")
        return self.batch

    def _segments(self, rows: np.ndarray, seeing: np.ndarray) -> list[Segment]:
        """The runs of consecutive rows of one sequence that see its image, and of rows that see none (an
        image of None: they pass through unchanged)."""
        sequences = self._current().sequences[rows]
        segments: list[Segment] = []
        for i, (sequence, sees) in enumerate(zip(sequences.tolist(), seeing.tolist())):
            image = self.seen[sequence].image if sees else None
            if segments and segments[-1].image is image:          # rows that see the same image: one run
                segments[-1] = Segment(segments[-1].first, segments[-1].count + 1, image)
            else:
                segments.append(Segment(i, 1, image))
        return segments

    def _cross_layers(self, name: bytes, x: np.ndarray, segments: list[Segment]) -> np.ndarray:
        """Run the layers at one point over the rows that see an image (rows that see none are copied
        through). The graph of a few rows (decoding) is built once per shape and kept with its own scratch
        memory; other shapes are built, run and dropped (a graph keeps the addresses its scratch gave it,
        so graphs may share scratch memory only one at a time)."""
        shape = [(s.count, s.image) for s in segments if s.image is not None]
        seeing = [s for s in segments if s.image is not None]
        rows = np.concatenate([x[s.first:s.first + s.count] for s in seeing]) if len(seeing) < len(segments) else x
        if len(rows) <= MAX_DECODE_ROWS:
            key = (name, *((count, id(image)) for count, image in shape))
            if key not in self.decode_graphs and len(self.decode_graphs) >= MAX_KEPT_GRAPHS:
                self._drop_graphs()                       # the batch's make-up keeps changing: start again
            if key not in self.decode_graphs:
                self.decode_graphs[key] = (*self._build(name, shape), ggml.Scratch(self.backends[name]))
            g, x_in, x_out, scratch = self.decode_graphs[key]
            scratch.run(g, {x_in: rows})
            out = ggml.tensor_get(x_out).reshape(rows.shape)
        else:
            g, x_in, x_out = self._build(name, shape)
            try:
                self.scratches[self.backends[name]].run(g, {x_in: rows})
                out = ggml.tensor_get(x_out).reshape(rows.shape)
            finally:
                g.close()
        if len(seeing) == len(segments):
            return out
        result, taken = x.copy(), 0
        for s in seeing:
            result[s.first:s.first + s.count] = out[taken:taken + s.count]
            taken += s.count
        return result

    def _build(self, name: bytes, shape: list[tuple[int, ImageKV]]) -> tuple[Graph, int, int]:
        g = Graph(64 * len(self.points[name]) * len(shape) + 8)
        x_in = g.input(F32, self.hp.hidden_size, sum(count for count, _ in shape), name="rows")
        x = x_in
        path = self.cpu_path if self.backends[name].is_cpu else GGML_CROSS_ATTENTION   # our kernels are CPU code
        for index in self.points[name]:
            images = [(count, image.keys[index], image.values_t[index]) for count, image in shape]
            x = cross_attention_layer(g, x, self.layers[index], self.gates[index], images, self.hp, path)
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
