"""The mllama vision tower as ggml graphs: tiles of pixels in, per-cross-layer image K/V out.

Reads like HF's MllamaVisionModel.forward, with Meta's semantics where the two differ (the
intermediate features are the *inputs* of the listed local layers). Hidden states are
[hidden, tokens] in ggml order; the token axis runs over all tiles, each tile padded to a multiple of 8,
in encoder order (the real tokens first, see `encoder_order`).

`VisionGraph` builds one stage's graph, as llama.cpp's `clip_graph` does: it holds the context, the
tower (weights, gates, hyperparameters, the paths its ops run) and the image, and each method builds
one part. `ImageEncoder` runs the stages (embeddings, each layer, the projection) so a caller sees
progress, can cancel between stages, and the scratch memory only ever holds one layer's activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Generator

import numpy as np

from models import ggml
from models.ggml import BF16, F16, F32, Graph, Tensor
from models.kernels import library, ops
from models.kernels.paths import (EXACT_PATHS, GGML_FLASH_ATTENTION, GGML_PATHS, GGML_PRODUCTS, Arithmetic, KernelPath,
                                  Paths)
from models.mllama import cross_attention
from models.mllama.hparams import MllamaHParams, VisionHParams
from models.mllama.image_kv import ImageKV
from models.mllama.weights import (CrossAttentionLayer, GlobalVisionLayer, Kind, Projector, VisionEmbeddings,
                                   VisionLayer, global_vision_layer_prefixes, gguf_name, names,
                                   vision_layer_prefixes)



class EncodeCancelled(Exception):
    """The caller asked, between two stages, to stop encoding; nothing of the image is kept."""


@dataclass(frozen=True)
class TowerGates:
    """tanh of the tower's gates: they scale whole branches, so they are plain numbers here."""

    pre_tile: float
    position: float
    post_tile: float
    global_attn: tuple[float, ...]
    global_ffn: tuple[float, ...]


@dataclass
class VisionTower:
    """The vision weights, their gates, and the paths the tower's ops run (`tower_paths`)."""

    hp: VisionHParams
    embeddings: VisionEmbeddings
    layers: list[VisionLayer]
    global_layers: list[GlobalVisionLayer]
    projector: Projector
    gates: TowerGates
    paths: Paths
    copies: list[ggml.Memory] | None = None  # the packed or BF16 copies of the F16 matrices, once made
    originals: dict[Tensor, Tensor] = field(default_factory=dict)   # copy -> the F16 matrix it was made of

    @classmethod
    def load(cls, tensors, hp: VisionHParams, paths: Paths) -> VisionTower:
        def tanh(block: type, name: str, prefix: str = "") -> float:
            return float(np.tanh(np.float32(tensors.scalar(gguf_name(block, name, prefix)))))
        global_prefixes = [global_vision_layer_prefixes(i)[0] for i in range(hp.num_global_layers)]
        gates = TowerGates(tanh(VisionEmbeddings, "pre_tile_gate"), tanh(VisionEmbeddings, "position_gate"),
                           tanh(VisionEmbeddings, "post_tile_gate"),
                           tuple(tanh(GlobalVisionLayer, "attn_gate", p) for p in global_prefixes),
                           tuple(tanh(GlobalVisionLayer, "ffn_gate", p) for p in global_prefixes))
        layers = [tensors.fill(VisionLayer, vision_layer_prefixes(i)[0]) for i in range(hp.num_hidden_layers)]
        return cls(hp, tensors.fill(VisionEmbeddings), layers,
                   [tensors.fill(GlobalVisionLayer, p) for p in global_prefixes], tensors.fill(Projector), gates, paths)

    @property
    def weights_type(self) -> int:
        return ggml.struct(self.layers[0].attn_q).type

    def make_copies(self, backend: ggml.Backend, scratch: ggml.Scratch) -> None:
        """Swap the F16 matrices for the copies their paths multiply (once; the encoder calls this first)."""
        if self.copies is None:
            self.copies = make_copies([*self.layers, *self.global_layers, self.projector], self.paths, backend,
                                      scratch, self.originals)

    def close(self) -> None:
        for memory in self.copies or []:
            memory.close()
        self.copies = None


def make_copies(blocks: list, paths: Paths, backend: ggml.Backend, scratch: ggml.Scratch,
                originals: dict[Tensor, Tensor]) -> list[ggml.Memory]:
    """Swap the F16 matrices of `blocks` for the copies their paths multiply: `paths.mlp_down`'s for the MLPs'
    down products, `paths.products`' for the others; returns the copies' memory."""
    roles = ((paths.products, lambda name: name != "ffn_down"), (paths.mlp_down, lambda name: name == "ffn_down"))
    return [memory for path, chosen in roles
            if (memory := swap_for_copies(blocks, path, backend, scratch, originals, chosen))]


def swap_for_copies(blocks: list, products: KernelPath, backend: ggml.Backend, scratch: ggml.Scratch,
                    originals: dict[Tensor, Tensor],
                    chosen: Callable[[str], bool] = lambda name: True) -> ggml.Memory | None:
    """Replace the F16 matrices of `blocks` (the fields `chosen` names) by the copies `products` multiplies:
    BF16 copies made by ggml, or copies packed by our kernel; returns their memory (None for ggml's product
    of the weights as stored, or when there are none) and notes in `originals` the matrix each copy was
    made of. Matrices of other types (a quantized tower's, or rows that fell back to another type) stay as
    they are."""
    if products == GGML_PRODUCTS:
        return None
    taken = ops.packs if products.ours else (lambda m: ggml.struct(m).type == int(F16))
    fields = [[w.field for w in names(type(block))
               if w.kind is Kind.MATRIX and chosen(w.field) and taken(getattr(block, w.field))] for block in blocks]
    matrices = [getattr(block, name) for block, block_fields in zip(blocks, fields) for name in block_fields]
    if not matrices:
        return None
    if products.ours:
        memory, copies = ops.pack(backend, matrices, products)
    else:
        memory, copies = ggml.converted(backend, scratch, matrices, BF16)
    copy_of = dict(zip(matrices, copies))
    originals.update(zip(copies, matrices))
    for block, block_fields in zip(blocks, fields):
        for name in block_fields:
            setattr(block, name, copy_of[getattr(block, name)])
    return memory


def tower_paths(chosen: Paths, weights_type: int, hp: VisionHParams, on_cpu: bool) -> Paths:
    """The paths a tower of `weights_type` runs, given the ones chosen for this CPU.

    An F32 tower is the exact one (F32 products, ggml's softmax and erf GELU). A tower on another device
    runs ggml's ops, which every backend has. Our products take F16 matrices (and ggml's BF16 copies are
    made of F16 ones); other types keep ggml's product of the weights as stored."""
    if weights_type == int(F32):
        return EXACT_PATHS
    if not on_cpu:
        return GGML_PATHS
    paths = chosen
    if weights_type != int(F16):
        paths = replace(paths, products=GGML_PRODUCTS, mlp_down=GGML_PRODUCTS)
    if paths.attention.ours and hp.hidden_size // hp.attention_heads > library.max_head_dim():
        paths = replace(paths, attention=GGML_FLASH_ATTENTION)
    return paths


def padded_patches(hp: VisionHParams) -> int:
    """Vision tokens per tile inside the encoder: patches + class token, padded to a multiple of 8."""
    return -(-hp.num_patches // 8) * 8


def patchify(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[tiles, 3, T, T] -> [tiles, patches, 3*P*P] in the conv kernel's (channel, row, column) order.

    The patch convolution has stride = kernel size, so it is exactly this rearrangement followed by a
    matrix product with the kernel; the product runs in ggml.
    """
    tiles, channels, side, _ = pixels.shape
    grid = side // patch
    x = pixels.reshape(tiles, channels, grid, patch, grid, patch).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(x.reshape(tiles, grid * grid, channels * patch * patch), dtype=np.float32)


def encoder_order(hp: VisionHParams, num_tiles: int) -> np.ndarray:
    """Where each encoder token comes from in the tile-major sequence: the real tokens first, then padding.

    Meta's mask hides a pair only when *both* tokens are padding (the HF/Meta quirk). With the real tokens
    first, real queries see every key and padding queries see only the real keys, so attention needs no
    mask. Attention is the one op that mixes tokens, so nothing else depends on the order.
    Padding = the pad tokens of every tile and every token of a tile past the image's real tiles.
    """
    per_tile = padded_patches(hp)
    is_pad = np.ones((hp.max_num_tiles, per_tile), dtype=bool)
    is_pad[:num_tiles, :hp.num_patches] = False
    flat = is_pad.reshape(-1)
    return np.concatenate([np.flatnonzero(~flat), np.flatnonzero(flat)]).astype(np.int32)


@dataclass(frozen=True)
class Image:
    """A preprocessed image as the tower takes it."""

    pixels: np.ndarray               # float32 [max_num_tiles, 3, tile, tile]
    aspect_ratio_id: int
    num_tiles: int


# ------------------------------------------------------------------------------------------- one stage's graph


class VisionGraph:
    """The graph of one stage of the tower over one image; each method builds one part of the network."""

    def __init__(self, tower: VisionTower, image: Image) -> None:
        self.g = Graph()
        self.tower, self.hp, self.paths, self.image = tower, tower.hp, tower.paths, image
        self.real = image.num_tiles * self.hp.num_patches        # real tokens: the first, in encoder order
        self.feeds: dict[Tensor, np.ndarray] = {}                # inputs, made on first use

    def run(self, output: Tensor, scratch: ggml.Scratch) -> None:
        self.g.expand(output)
        scratch.run(self.g, self.feeds)

    def close(self) -> None:
        self.g.close()

    # ---- inputs

    def _input(self, qtype, array: np.ndarray, name: str) -> Tensor:
        t = self.g.input(qtype, *reversed(array.shape), name=name)
        self.feeds[t] = array
        return t

    @cached_property
    def aspect_ratio(self) -> Tensor:
        return self._input(ggml.I32, np.array([self.image.aspect_ratio_id], dtype=np.int32), "aspect_ratio_id")

    @cached_property
    def order(self) -> Tensor:
        return self._input(ggml.I32, encoder_order(self.hp, self.image.num_tiles), "encoder_order")

    @cached_property
    def tile_of(self) -> Tensor:
        """The tile of each token, in encoder order."""
        tiles = encoder_order(self.hp, self.image.num_tiles) // padded_patches(self.hp)
        return self._input(ggml.I32, tiles.astype(np.int32), "tile_of")

    @cached_property
    def patches(self) -> Tensor:
        return self._input(F32, patchify(self.image.pixels, self.hp.patch_size), "patches")

    # ---- the network

    def embeddings(self) -> Tensor:
        """Patch embedding, tile and position embeddings, class token, pre-norm, padding: [hidden, L] in
        encoder order."""
        g, hp, w, gates = self.g, self.hp, self.tower.embeddings, self.tower.gates
        d, tiles, n = hp.hidden_size, hp.max_num_tiles, hp.num_patches
        kernel = g.reshape(w.patch_embd, hp.num_channels * hp.patch_size ** 2, d)
        x = g.mul_mat(kernel, self.patches)                                             # [d, n-1, tiles]
        pre_tile = g.reshape(g.get_rows(w.pre_tile_embd, self.aspect_ratio), d, 1, tiles)
        x = g.add(x, g.scale(pre_tile, gates.pre_tile))
        cls = g.repeat(g.reshape(g.cast(w.class_embd, F32), d, 1, 1), d, 1, tiles)
        x = g.concat(cls, x, 1)                                                         # [d, n, tiles]
        x = g.add(x, g.scale(g.cast(w.position_embd, F32), 1.0 - gates.position))
        tile_position = g.reshape(g.get_rows(w.tile_position_embd, self.aspect_ratio), d, n, tiles)
        x = g.add(x, g.scale(tile_position, gates.position))
        x = g.layer_norm(x, w.pre_norm, w.pre_norm_bias, hp.norm_eps)
        x = g.pad(x, 0, padded_patches(hp) - n)
        return g.get_rows(g.reshape(x, d, padded_patches(hp) * tiles), self.order)

    def encoder_layer(self, x: Tensor, w: VisionLayer, gates: tuple[float, float] = (1.0, 1.0)) -> Tensor:
        """Pre-norm transformer layer; the global layers scale both branches by their tanh gates."""
        g, eps = self.g, self.hp.norm_eps
        attn_gate, ffn_gate = gates
        attended = self.self_attention(g.layer_norm(x, w.attn_norm, w.attn_norm_bias, eps), w)
        x = g.add(x, g.scale(attended, attn_gate) if attn_gate != 1.0 else attended)
        transformed = self.mlp(g.layer_norm(x, w.ffn_norm, w.ffn_norm_bias, eps), w)
        return g.add(x, g.scale(transformed, ffn_gate) if ffn_gate != 1.0 else transformed)

    def self_attention(self, x: Tensor, w: VisionLayer) -> Tensor:
        q, k, v = (self.product(weight, x) for weight in (w.attn_q, w.attn_k, w.attn_v))   # [d, L] each
        return self.product(w.attn_output, self.attend(q, k, v))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attend(self.g, q, k, v, self.hp.attention_heads, self.real, self.paths.attention)

    def mlp(self, x: Tensor, w: VisionLayer) -> Tensor:
        hidden = self.gelu(self.product(w.ffn_up, x), w.ffn_up_bias)
        return self.g.add(self.product(w.ffn_down, hidden, self.paths.mlp_down), w.ffn_down_bias)

    def product(self, weight: Tensor, x: Tensor, path: KernelPath | None = None) -> Tensor:
        """weight · x in `path` (the products' unless said)."""
        return product(self.g, weight, x, path or self.paths.products, self.tower.originals.get(weight))

    def gelu(self, x: Tensor, bias: Tensor) -> Tensor:
        return biased_gelu(self.g, x, bias, self.paths.gelu)

    def post_norm(self, x: Tensor) -> Tensor:
        """layernorm_post, then the post-tile embedding of each token's tile (pad tokens too, as HF does)."""
        g, hp, w = self.g, self.hp, self.tower.embeddings
        post_tile = g.reshape(g.get_rows(w.post_tile_embd, self.aspect_ratio), hp.hidden_size, hp.max_num_tiles)
        x = g.layer_norm(x, w.post_norm, w.post_norm_bias, hp.norm_eps)
        return g.add(x, g.scale(g.get_rows(post_tile, self.tile_of), self.tower.gates.post_tile))

    def features(self, final: Tensor, intermediates: list[Tensor]) -> Tensor:
        """[final, intermediates] of the real tokens (the first in encoder order): [output_dim, real].

        HF stacks the intermediates on a new last axis and flattens, so their channels interleave (d0·i0, d0·i1, ...).
        """
        g, d, real = self.g, self.hp.hidden_size, self.real
        stacked = g.reshape(g.view(intermediates[0], (d, real)), 1, d, real)
        for t in intermediates[1:]:
            stacked = g.concat(stacked, g.reshape(g.view(t, (d, real)), 1, d, real), 0)
        return g.concat(g.view(final, (d, real)), g.reshape(stacked, d * len(intermediates), real), 0)

    def projected(self, final: Tensor, intermediates: list[Tensor]) -> Tensor:
        """The multi-modal projector over the features: [text hidden, real]."""
        projector = self.tower.projector
        return self.g.add(self.product(projector.weight, self.features(final, intermediates)), projector.bias)


# ------------------------------------------------------------------------------------------- ops by path


def attend(g: Graph, q: Tensor, k: Tensor, v: Tensor, heads: int, real: int, path: KernelPath) -> Tensor:
    """softmax(q kᵀ / √hd) v per head for [d, L] q, k, v in encoder order; [d, L] out. The first `real`
    queries see every token, the rest only the real ones. `path`: our fused kernel, ggml's flash attention
    (F16 K/V, any backend) or ggml's exact F32 products and softmax."""
    d, length = ggml.shape(q)[:2]
    hd = d // heads
    if path.ours:
        return ops.fused_attention(g, q, k, v, heads, real, hd ** -0.5, path)
    flash = path == GGML_FLASH_ATTENTION
    heads_of = lambda t: g.permute(g.reshape(t, hd, heads, length), 0, 2, 1)        # noqa: E731  [hd, L, heads]
    q, k, v = heads_of(q), heads_of(k), heads_of(v)
    if flash:
        k, v = g.cast(k, F16), g.cast(v, F16)
    else:
        k, v = g.cont(k), g.cont(g.permute(v, 1, 0, 2))                            # v: [L, hd, heads]

    def queries(first: int, count: int, keys: int) -> Tensor:
        """Queries first..first+count over the first `keys` tokens: [hd, heads, count]."""
        rows = g.view(q, (hd, count, heads), first * ggml.struct(q).nb[1])
        if flash:
            return g.flash_attn(rows, g.view(k, (hd, keys, heads)), g.view(v, (hd, keys, heads)), None, hd ** -0.5)
        scores = g.soft_max(g.mul_mat(g.view(k, (hd, keys, heads)), rows), None, hd ** -0.5)  # [keys, count, heads]
        return g.permute(g.mul_mat(g.view(v, (keys, hd, heads)), scores), 0, 2, 1)

    out = queries(0, real, length)
    if real < length:
        out = g.concat(out, queries(real, length - real, real), 2)
    return g.reshape(g.cont(out), d, length)


def product(g: Graph, weight: Tensor, x: Tensor, path: KernelPath, original: Tensor | None = None) -> Tensor:
    """weight · x: our product for a matrix `VisionTower.make_copies` packed for `path` (from `original`),
    else ggml's."""
    if ggml.struct(weight).type == int(ops.I8):
        return ops.product(g, weight, x, path, original)
    return g.mul_mat(weight, x)


def biased_gelu(g: Graph, x: Tensor, bias: Tensor, path: KernelPath) -> Tensor:
    """gelu(x + bias), erf's GELU (the model's): our vectorised one, which adds the bias on the way (within
    2.5e-7 of the exact); ggml's exact erf (F32); or ggml's tabulated tanh form (F16), within 4e-3 of erf's,
    below the rounding that the half-precision towers' products make."""
    if path.ours:
        return ops.gelu(g, x, path, bias)
    x = g.add(x, bias)
    return g.gelu(x) if path.arithmetic is Arithmetic.F32 else g.gelu_tanh(x)


# ------------------------------------------------------------------------------------------- the stages


Stage = Callable[[VisionGraph], Tensor]


class ImageEncoder:
    """Runs the tower on one image at a time, stage by stage, and keeps the K/V of each cross layer."""

    def __init__(self, backend: ggml.Backend, scratch: ggml.Scratch, tower: VisionTower,
                 cross_layers: dict[int, CrossAttentionLayer], hp: MllamaHParams, kv_type) -> None:
        self.backend, self.scratch, self.tower, self.cross_layers = backend, scratch, tower, cross_layers
        self.hp, self.kv_type = hp, kv_type

    def stages(self, image: Image) -> Generator[float, None, ImageKV]:
        """The encode, one stage at a time: yields the fraction done after each stage and returns the K/V.
        Closing it early (a cancelled encode) frees everything it made."""
        self.tower.make_copies(self.backend, self.scratch)        # the first encode makes them (a second or two)
        v = self.hp.vision
        kv = ImageKV.empty(dict.fromkeys(self.cross_layers, self.backend), self.hp,
                           image.num_tiles * v.num_patches, self.kv_type)
        try:
            with ggml.Memory(1 + len(v.intermediate_layers_indices)) as activations:   # live across stages
                stages = self._stages(activations, kv)
                activations.allocate(self.backend)
                for done, stage in enumerate(stages, start=1):
                    graph = VisionGraph(self.tower, image)
                    try:
                        graph.run(stage(graph), self.scratch)
                    finally:
                        graph.close()
                    yield done / len(stages)
        except BaseException:
            kv.close()
            raise
        return kv

    def encode(self, image: Image) -> ImageKV:
        """The whole encode at once."""
        stages = self.stages(image)
        while True:
            try:
                next(stages)
            except StopIteration as finished:
                return finished.value

    def _stages(self, activations: ggml.Memory, kv: ImageKV) -> list[Stage]:
        """The tower as stages, each a graph that reads and writes the activations kept across stages."""
        v = self.hp.vision
        length = padded_patches(v) * v.max_num_tiles
        hidden = activations.new(F32, v.hidden_size, length, name="hidden")
        saved = {layer: activations.new(F32, v.hidden_size, length, name=f"intermediate.{layer}")
                 for layer in v.intermediate_layers_indices}

        def embeddings(graph: VisionGraph) -> Tensor:
            return graph.g.cpy(graph.embeddings(), hidden)

        def local(index: int) -> Stage:
            def stage(graph: VisionGraph) -> Tensor:
                if index in saved:                                # Meta keeps the layer's *input*
                    graph.g.expand(graph.g.cpy(hidden, saved[index]))
                return graph.g.cpy(graph.encoder_layer(hidden, self.tower.layers[index]), hidden)
            return stage

        def global_(index: int) -> Stage:
            gates = (self.tower.gates.global_attn[index], self.tower.gates.global_ffn[index])

            def stage(graph: VisionGraph) -> Tensor:
                x = graph.post_norm(hidden) if index == 0 else hidden
                return graph.g.cpy(graph.encoder_layer(x, self.tower.global_layers[index], gates), hidden)
            return stage

        def project(graph: VisionGraph) -> Tensor:
            projected = graph.projected(hidden, list(saved.values()))
            for index, layer in self.cross_layers.items():
                key, value_t = cross_attention.image_key_value(graph.g, projected, layer, self.hp.text)
                graph.g.expand(graph.g.cpy(key, kv.keys[index]))
                graph.g.expand(graph.g.cpy(value_t, kv.values_t[index]))
            return projected

        return [embeddings, *map(local, range(len(self.tower.layers))),
                *map(global_, range(len(self.tower.global_layers))), project]
