"""The mllama vision tower as ggml graphs: tiles of pixels in, per-cross-layer image K/V out.

Reads like HF's MllamaVisionModel.forward, with Meta's semantics where the two differ (the
intermediate features are the *inputs* of the listed local layers). Hidden states are
[hidden, tokens] in ggml order; the token axis runs over all tiles, each tile padded to a multiple of 8,
in encoder order (the real tokens first, see `encoder_order`).

The tower runs in stages (embeddings, each layer, the projection) so a caller sees progress, can cancel
between stages, and the scratch memory only ever holds one layer's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np

from models import ggml
from models.ggml import BF16, F16, F32, Graph, Tensor
from models.mllama.hparams import MllamaHParams, VisionHParams
from models.mllama.weights import (CrossAttentionLayer, GlobalVisionLayer, Kind, Projector, VisionEmbeddings,
                                   VisionLayer, global_vision_layer_prefixes, names, vision_layer_prefixes)
from models.kernels import cpu as kernels
from models.mllama import cross_attention

Progress = Callable[[float], None]


class EncodeCancelled(Exception):
    """The caller's `cancelled()` said so between two stages; nothing of the image is kept."""


@dataclass
class VisionTower:
    """The vision weights with their tanh'd gates as plain numbers (they scale whole branches)."""

    embeddings: VisionEmbeddings
    layers: list[VisionLayer]
    global_layers: list[GlobalVisionLayer]
    projector: Projector
    gates: dict[str, float]          # pre_tile, position, post_tile, global.{i}.attn, global.{i}.ffn
    attention: str                   # how `attend` runs: see `attention_for`
    products: str = "ggml"           # how F16 matrices are multiplied: see `products_for`
    copies: tuple[Graph, int] | None = None   # their BF16 or int16 copies once made: context and buffer

    @classmethod
    def load(cls, tensors, hp: VisionHParams, on_cpu: bool) -> VisionTower:
        embeddings = tensors.fill(VisionEmbeddings)
        tanh = lambda name: float(np.tanh(np.float32(tensors.scalar(name))))  # noqa: E731
        gates = {"pre_tile": tanh("v.pre_tile_gate"), "position": tanh("v.position_gate"),
                 "post_tile": tanh("v.post_tile_gate")}
        global_layers = []
        for i in range(hp.num_global_layers):
            prefix = global_vision_layer_prefixes(i)[0]
            global_layers.append(tensors.fill(GlobalVisionLayer, prefix))
            gates[f"global.{i}.attn"] = tanh(prefix + "attn_gate")
            gates[f"global.{i}.ffn"] = tanh(prefix + "ffn_gate")
        layers = [tensors.fill(VisionLayer, vision_layer_prefixes(i)[0]) for i in range(hp.num_hidden_layers)]
        weights_type = ggml.struct(layers[0].attn_q).type
        attention = attention_for(weights_type, hp, on_cpu)
        return cls(embeddings, layers, global_layers, tensors.fill(Projector), gates, attention,
                   products_for(weights_type, attention, on_cpu))

    def make_copies(self, backend: ggml.Backend, scratch: ggml.Scratch) -> None:
        """Swap the F16 matrices for the copies `products` multiplies (once; `encode` calls this first):
        BF16 copies made by ggml, or int16 ones packed by our kernel. Matrices of other types (a quantized
        tower's, or rows that fell back to another type) stay as they are."""
        blocks = [*self.layers, *self.global_layers, self.projector]
        self.copies = swap_for_copies(blocks, self.products, backend, scratch)

    def close(self) -> None:
        if self.copies:
            ggml.free_buffer(self.copies[1])
            self.copies[0].close()
            self.copies = None


def swap_for_copies(blocks: list, products: str, backend: ggml.Backend,
                    scratch: ggml.Scratch | None) -> tuple[Graph, int]:
    """Replace the F16 matrices of `blocks` by their BF16 copies (made by ggml: `scratch` runs the copy) or
    int16 ones; returns the copies' context and buffer."""
    taken = (lambda m: ggml.struct(m).type == int(F16)) if products == "bf16" else kernels.int16_fits
    fields = [[w.field for w in names(type(block)) if w.kind is Kind.MATRIX and taken(getattr(block, w.field))]
              for block in blocks]
    originals = [getattr(block, field) for block, block_fields in zip(blocks, fields) for field in block_fields]
    if products == "bf16":
        graph, buffer, copies = ggml.converted(backend, scratch, originals, BF16)
    else:
        graph, buffer, copies = kernels.int16_packed(backend, originals)
    copy_of = dict(zip(originals, copies))
    for block, block_fields in zip(blocks, fields):
        for field in block_fields:
            setattr(block, field, copy_of[getattr(block, field)])
    return graph, buffer


def products_for(weights_type: int, attention: str, on_cpu: bool) -> str:
    """How an F16 tower's matrices are multiplied on the CPU; "ggml" (ggml's own product of the weights as
    they are) elsewhere and for other types.

    - "int16" beside our kernel's AVX2 path (or its reference, in tests) where ggml has no AVX-512: weights
      and activations rounded to 14- and 13-bit integers with a scale per 64 values, as close to the exact
      product as ggml's F16 one (which rounds the activations to F16) and faster on AVX2, whose integer
      multiply-adds outrun its F32 FMAs (`kernels.int16_product`). `LVA_ATTENTION=avx2|reference` chooses
      it on any CPU.
    - "bf16" where ggml's CPU backend computes BF16 natively (AVX512_BF16): its BF16 products run at about
      twice its F16 rate. The copy is exact for weights that came from a BF16 checkpoint, as Llama 3.2
      Vision's do (F16 holds every BF16 value of its range); others round to BF16. The activations are
      rounded to BF16 too, as in any BF16 product (and in HF's bf16 tower).
    """
    if weights_type != int(F16) or not on_cpu:
        return "ggml"
    features = ggml.cpu_features()
    if attention in ("avx2", "reference") and (kernels.path_is_forced() or features.get("AVX512") != "1"):
        return "int16"
    return "bf16" if features.get("AVX512_BF16") == "1" else "ggml"


def attention_for(weights_type: int, hp: VisionHParams, on_cpu: bool) -> str:
    """An F32 tower is the exact one: F32 softmax. Others take our fused kernel on the CPU (its fastest path
    this CPU runs), else ggml's flash attention, which every backend has."""
    if weights_type == int(F32):
        return "softmax"
    path = kernels.chosen_path() if on_cpu else None
    if path is None or hp.hidden_size // hp.attention_heads > kernels.max_head_dim():
        return "flash"
    return path


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
    is_pad = is_pad.reshape(-1)
    return np.concatenate([np.flatnonzero(~is_pad), np.flatnonzero(is_pad)]).astype(np.int32)


# ------------------------------------------------------------------------------------------- graph pieces


def embed(g: Graph, w: VisionEmbeddings, gates: dict[str, float], hp: VisionHParams,
          patches: Tensor, ratio_id: Tensor) -> Tensor:
    """Patch embedding, tile and position embeddings, class token, pre-norm, padding: [hidden, L]."""
    d, tiles, n = hp.hidden_size, hp.max_num_tiles, hp.num_patches
    kernel = g.reshape(w.patch_embd, hp.num_channels * hp.patch_size ** 2, d)
    x = g.mul_mat(kernel, patches)                                                  # [d, n-1, tiles]
    pre_tile = g.reshape(g.get_rows(w.pre_tile_embd, ratio_id), d, 1, tiles)
    x = g.add(x, g.scale(pre_tile, gates["pre_tile"]))
    cls = g.repeat(g.reshape(g.cast(w.class_embd, F32), d, 1, 1), d, 1, tiles)
    x = g.concat(cls, x, 1)                                                         # [d, n, tiles]
    x = g.add(x, g.scale(g.cast(w.position_embd, F32), 1.0 - gates["position"]))
    tile_position = g.reshape(g.get_rows(w.tile_position_embd, ratio_id), d, n, tiles)
    x = g.add(x, g.scale(tile_position, gates["position"]))
    x = g.layer_norm(x, w.pre_norm, w.pre_norm_bias, hp.norm_eps)
    x = g.pad(x, 0, padded_patches(hp) - n)
    return g.reshape(x, d, padded_patches(hp) * tiles)


def self_attention(g: Graph, x: Tensor, w: VisionLayer, hp: VisionHParams, real: int, attention: str) -> Tensor:
    """Attention over tokens in encoder order: the first `real` see every token, the rest only those."""
    q, k, v = (product(g, weight, x, attention) for weight in (w.attn_q, w.attn_k, w.attn_v))  # [d, L] each
    return product(g, w.attn_output, attend(g, q, k, v, hp.attention_heads, real, attention), attention)


def attend(g: Graph, q: Tensor, k: Tensor, v: Tensor, heads: int, real: int, attention: str) -> Tensor:
    """softmax(q kᵀ / √hd) v per head for [d, L] q, k, v in encoder order; [d, L] out.

    `attention` says how: "softmax" is exact (F32 products and ggml's softmax), "flash" is ggml's flash
    attention with F16 K/V (any backend), anything else is a path of our fused CPU kernel.
    """
    d, length = ggml.shape(q)[:2]
    hd = d // heads
    if attention not in ("softmax", "flash"):
        return kernels.fused_attention(g, q, k, v, heads, real, hd ** -0.5, attention)
    heads_of = lambda t: g.permute(g.reshape(t, hd, heads, length), 0, 2, 1)        # noqa: E731  [hd, L, heads]
    q, k, v = heads_of(q), heads_of(k), heads_of(v)
    if attention == "flash":
        k, v = g.cast(k, F16), g.cast(v, F16)
    else:
        k, v = g.cont(k), g.cont(g.permute(v, 1, 0, 2))                            # v: [L, hd, heads]

    def queries(first: int, count: int, keys: int) -> Tensor:
        """Queries first..first+count over the first `keys` tokens: [hd, heads, count]."""
        rows = g.view(q, (hd, count, heads), first * ggml.struct(q).nb[1])
        if attention == "flash":
            return g.flash_attn(rows, g.view(k, (hd, keys, heads)), g.view(v, (hd, keys, heads)), None, hd ** -0.5)
        scores = g.soft_max(g.mul_mat(g.view(k, (hd, keys, heads)), rows), None, hd ** -0.5)  # [keys, count, heads]
        return g.permute(g.mul_mat(g.view(v, (keys, hd, heads)), scores), 0, 2, 1)

    out = queries(0, real, length)
    if real < length:
        out = g.concat(out, queries(real, length - real, real), 2)
    return g.reshape(g.cont(out), d, length)


def encoder_layer(g: Graph, x: Tensor, w: VisionLayer, hp: VisionHParams, real: int, attention: str,
                  attn_gate: float = 1.0, ffn_gate: float = 1.0) -> Tensor:
    """Pre-norm transformer layer; the global layers scale both branches by their tanh gates."""
    h = self_attention(g, g.layer_norm(x, w.attn_norm, w.attn_norm_bias, hp.norm_eps), w, hp, real, attention)
    x = g.add(x, g.scale(h, attn_gate) if attn_gate != 1.0 else h)
    h = g.layer_norm(x, w.ffn_norm, w.ffn_norm_bias, hp.norm_eps)
    h = mlp(g, h, w, attention)
    return g.add(x, g.scale(h, ffn_gate) if ffn_gate != 1.0 else h)


def mlp(g: Graph, x: Tensor, w: VisionLayer, attention: str) -> Tensor:
    h = biased_gelu(g, product(g, w.ffn_up, x, attention), w.ffn_up_bias, attention)
    return g.add(product(g, w.ffn_down, h, attention), w.ffn_down_bias)


def product(g: Graph, weight: Tensor, x: Tensor, attention: str) -> Tensor:
    """weight · x: ggml's product, or our int16 one for a matrix that `make_copies` packed for it (its path
    is the attention's)."""
    if ggml.struct(weight).type == int(kernels.I16):
        return kernels.int16_product(g, weight, x, attention)
    return g.mul_mat(weight, x)


def biased_gelu(g: Graph, x: Tensor, bias: Tensor, attention: str) -> Tensor:
    """gelu(x + bias), erf's GELU (the model's), with the kernels the attention uses: ggml's exact one in
    the F32 tower; our vectorised one beside our attention kernel, which adds the bias on the way (within
    2.5e-7 of the exact, several times faster); else ggml's tabulated tanh form, which every backend has,
    within 4e-3 of erf's, below the rounding of the activations that the other towers' F16/BF16 products
    make."""
    if attention in kernels.PATHS:
        return kernels.gelu(g, x, attention, bias)
    x = g.add(x, bias)
    return g.gelu(x) if attention == "softmax" else g.gelu_tanh(x)


def post_norm(g: Graph, x: Tensor, w: VisionEmbeddings, gates: dict[str, float], hp: VisionHParams,
              ratio_id: Tensor, tile_of: Tensor) -> Tensor:
    """layernorm_post, then the post-tile embedding of each token's tile (pad tokens too, as HF does)."""
    post_tile = g.reshape(g.get_rows(w.post_tile_embd, ratio_id), hp.hidden_size, hp.max_num_tiles)
    x = g.layer_norm(x, w.post_norm, w.post_norm_bias, hp.norm_eps)
    return g.add(x, g.scale(g.get_rows(post_tile, tile_of), gates["post_tile"]))


def features(g: Graph, final: Tensor, intermediates: list[Tensor], hp: VisionHParams, real: int) -> Tensor:
    """[final, intermediates] of the real tokens (the first in encoder order): [output_dim, real].

    HF stacks the intermediates on a new last axis and flattens, so their channels interleave (d0·i0, d0·i1, ...).
    """
    d = hp.hidden_size
    stacked = g.reshape(g.view(intermediates[0], (d, real)), 1, d, real)
    for t in intermediates[1:]:
        stacked = g.concat(stacked, g.reshape(g.view(t, (d, real)), 1, d, real), 0)
    return g.concat(g.view(final, (d, real)), g.reshape(stacked, d * len(intermediates), real), 0)


# ------------------------------------------------------------------------------------------- the stages


@dataclass
class ImageKV:
    """What the decoder needs of one image: K and V for every cross layer, kept on that layer's backend."""

    memory: list[tuple[Graph, int]]  # per backend: the context describing the tensors, and their buffer
    keys: dict[int, Tensor]          # cross-layer stack index -> [head_dim, tokens, kv_heads]
    values_t: dict[int, Tensor]      # cross-layer stack index -> [tokens, head_dim, kv_heads]
    num_tokens: int

    def close(self) -> None:
        for graph, buffer in self.memory:
            ggml.free_buffer(buffer)
            graph.close()
        self.memory = []

    def moved_to(self, backends: dict[int, ggml.Backend], hp: MllamaHParams) -> ImageKV:
        """The same K/V on the given backend of each cross layer; this one is closed."""
        kv_type = ggml.struct(next(iter(self.keys.values()))).type
        moved = new_image_kv(backends, hp, self.num_tokens, kv_type)
        for index in self.keys:
            ggml.copy_tensor(self.keys[index], moved.keys[index])
            ggml.copy_tensor(self.values_t[index], moved.values_t[index])
        self.close()
        return moved

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Host copies, for the on-disk feature cache."""
        arrays = {}
        for index in self.keys:
            for name, t in ((f"k.{index}", self.keys[index]), (f"v.{index}", self.values_t[index])):
                dtype = np.float16 if ggml.struct(t).type == int(F16) else np.float32
                arrays[name] = ggml.tensor_get(t, dtype)
        return arrays

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        for index in self.keys:
            ggml.tensor_set(self.keys[index], arrays[f"k.{index}"])
            ggml.tensor_set(self.values_t[index], arrays[f"v.{index}"])


class StageInputs:
    """The image's inputs, made in a stage's graph on first use (a stage gets only those it needs)."""

    def __init__(self, g: Graph, image: Image, hp: VisionHParams) -> None:
        self.g, self.image, self.hp = g, image, hp
        self.feeds: dict[Tensor, np.ndarray] = {}

    def _input(self, qtype, array: np.ndarray, name: str) -> Tensor:
        t = self.g.input(qtype, *reversed(array.shape), name=name)
        self.feeds[t] = array
        return t

    @cached_property
    def ratio(self) -> Tensor:
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


@dataclass(frozen=True)
class Image:
    """A preprocessed image as the tower takes it."""

    pixels: np.ndarray               # float32 [max_num_tiles, 3, tile, tile]
    aspect_ratio_id: int
    num_tiles: int


def encode(backend: ggml.Backend, scratch: ggml.Scratch, tower: VisionTower,
           cross_layers: dict[int, CrossAttentionLayer], hp: MllamaHParams, image: Image, kv_type,
           progress: Progress | None = None, cancelled: Callable[[], bool] | None = None) -> ImageKV:
    """Run the tower on one preprocessed image and keep K/V for each cross layer."""
    if tower.products != "ggml" and tower.copies is None:   # the first encode makes the copies (a second or two)
        tower.make_copies(backend, scratch)
    v, attention = hp.vision, tower.attention
    length, real = padded_patches(v) * v.max_num_tiles, image.num_tiles * v.num_patches
    saved_at = {layer: k for k, layer in enumerate(v.intermediate_layers_indices)}

    work = Graph(4 + len(saved_at))                         # activations that live across stages
    hidden = work.new(F32, v.hidden_size, length, name="hidden")
    saved = [work.new(F32, v.hidden_size, length, name=f"intermediate.{k}") for k in range(len(saved_at))]
    work_buffer = backend.alloc(work)
    kv = new_image_kv({index: backend for index in cross_layers}, hp, real, kv_type)
    stages: list[Callable[[Graph, StageInputs], Tensor]] = []

    def embeddings(g: Graph, x: StageInputs) -> Tensor:
        return g.cpy(g.get_rows(embed(g, tower.embeddings, tower.gates, v, x.patches, x.ratio), x.order), hidden)
    stages.append(embeddings)

    for i, layer in enumerate(tower.layers):
        def local(g: Graph, x: StageInputs, i=i, layer=layer) -> Tensor:
            if i in saved_at:                                 # Meta keeps the layer's *input*
                g.expand(g.cpy(hidden, saved[saved_at[i]]))
            return g.cpy(encoder_layer(g, hidden, layer, v, real, attention), hidden)
        stages.append(local)

    for i, layer in enumerate(tower.global_layers):
        def global_(g: Graph, x: StageInputs, i=i, layer=layer) -> Tensor:
            h = post_norm(g, hidden, tower.embeddings, tower.gates, v, x.ratio, x.tile_of) if i == 0 else hidden
            return g.cpy(encoder_layer(g, h, layer, v, real, attention, tower.gates[f"global.{i}.attn"],
                                       tower.gates[f"global.{i}.ffn"]), hidden)
        stages.append(global_)

    def project(g: Graph, x: StageInputs) -> Tensor:
        projected = g.add(product(g, tower.projector.weight, features(g, hidden, saved, v, real), attention),
                          tower.projector.bias)
        for index, layer in cross_layers.items():
            key, value_t = cross_attention.image_key_value(g, projected, layer, hp.text)
            g.expand(g.cpy(key, kv.keys[index]))
            g.expand(g.cpy(value_t, kv.values_t[index]))
        return projected
    stages.append(project)

    try:
        for done, build in enumerate(stages, start=1):
            if cancelled is not None and cancelled():
                raise EncodeCancelled("the image encode was cancelled")
            g = Graph()
            inputs = StageInputs(g, image, v)
            g.expand(build(g, inputs))
            scratch.run(g, inputs.feeds)
            g.close()
            if progress:
                progress(done / len(stages))
    except BaseException:
        kv.close()
        raise
    finally:
        ggml.free_buffer(work_buffer)
        work.close()
    return kv


def new_image_kv(backends: dict[int, ggml.Backend], hp: MllamaHParams, tokens: int, kv_type) -> ImageKV:
    """Empty K/V of an image for each cross layer (stack index -> the backend that keeps them)."""
    t = hp.text
    kv = ImageKV([], {}, {}, tokens)
    for backend in dict.fromkeys(backends.values()):
        indices = [i for i, b in backends.items() if b is backend]
        g = Graph(2 * len(indices) + 1)
        for i in indices:
            kv.keys[i] = g.new(kv_type, t.head_dim, tokens, t.num_key_value_heads, name=f"cross.{i}.k")
            kv.values_t[i] = g.new(kv_type, tokens, t.head_dim, t.num_key_value_heads, name=f"cross.{i}.v")
        try:
            kv.memory.append((g, backend.alloc(g)))
        except ggml.DeviceError:
            kv.close()
            raise
    return kv
