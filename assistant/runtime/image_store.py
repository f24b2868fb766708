"""Encoded images: the last few kept in memory, every one on disk (the feature cache), and new ones encoded
stage by stage, so a caller can interleave an encode with other work (parallel.py) or cancel it.

An image is known by its content, the model pair, and the arithmetic its tower runs: features encoded
under one path are not reused under another (the paths differ in their rounding), so a change of the
paths this machine chose, or of the ones forced, encodes the image again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generator, Protocol

import numpy as np

from assistant.images import ImageSource, content_id, load_image, preprocess
from assistant.runtime.errors import ModelError
from assistant.runtime.vision_file import VisionFile
from models import ggml
from models.mllama.image_kv import ImageKV
from models.mllama.vision import EncodeCancelled, Image, ImageEncoder

IMAGE_CACHE_SIZE = 4
Progress = Callable[[str, float], None]


class FeatureStore(Protocol):
    """Where encoded images outlive the process (assistant.chat.feature_cache.FeatureCache)."""

    def load(self, key: str) -> dict[str, np.ndarray] | None: ...

    def store(self, key: str, arrays: dict[str, np.ndarray]) -> None: ...


class ImageStore:
    def __init__(self, vision: VisionFile, encoder: ImageEncoder, vision_backend: ggml.Backend,
                 cross_backends: dict[int, ggml.Backend], feature_cache: FeatureStore | None,
                 in_use: Callable[[], list[ImageKV]]) -> None:
        """`in_use()`: the images sequences see now, which the memory cache never drops."""
        self.vision, self.encoder, self.feature_cache, self.in_use = vision, encoder, feature_cache, in_use
        self.vision_backend, self.cross_backends = vision_backend, cross_backends
        self.encoded = 0                                     # runs of the vision encoder (cache hits do not count)
        self._kept: OrderedDict[str, ImageKV] = OrderedDict()

    def key(self, image: ImageSource) -> str:
        p = self.encoder.tower.paths
        return f"{content_id(load_image(image))}:{self.vision.pair_id}:{p.attention}+{p.products}+{p.mlp_down}"

    def encode(self, image: ImageSource, progress: Progress | None = None,
               cancelled: Callable[[], bool] | None = None) -> tuple[str, ImageKV]:
        """K/V of every cross layer for an image. `cancelled()` is asked between the encoder's stages (about a
        second apart on a CPU); when it says True, EncodeCancelled is raised and nothing is kept."""
        stages = self.encoding(image, progress)
        try:
            while True:
                if cancelled is not None and cancelled():
                    raise EncodeCancelled("the image encode was cancelled")
                next(stages)
        except StopIteration as finished:
            return finished.value
        finally:
            stages.close()

    def encoding(self, image: ImageSource, progress: Progress | None = None) -> Generator[None, None,
                                                                                             tuple[str, ImageKV]]:
        """The encode as a generator: it yields after each stage of the encoder (none when the image is kept
        in memory or on disk) and returns (key, K/V)."""
        picture = load_image(image)
        key = self.key(picture)
        if key in self._kept:
            self._kept.move_to_end(key)
            return key, self._kept[key]
        hp = self.vision.hp
        v = hp.vision
        pre = preprocess(picture, hp.preprocessing, v.image_size, v.max_num_tiles, v.supported_aspect_ratios)
        if progress:
            progress("encoding image", 0.0)          # preprocessed: the encoder's stages follow
        kv = self._from_disk(key, pre.num_tiles * v.num_patches)
        if kv is None:
            try:
                stages = self.encoder.stages(Image(pre.pixels, pre.aspect_ratio_id, pre.num_tiles))
                while True:
                    try:
                        fraction = next(stages)
                    except StopIteration as finished:
                        kv = finished.value
                        break
                    if progress:
                        progress("encoding image", fraction)
                    yield
                if any(backend is not self.vision_backend for backend in self.cross_backends.values()):
                    kv = kv.moved_to(self.cross_backends, hp)
            except ggml.DeviceError as exc:
                raise ModelError(f"the image cannot be encoded: {exc}") from None
            self.encoded += 1
            if self.feature_cache:
                self.feature_cache.store(key, kv.to_arrays())
        self._kept[key] = kv
        self._evict()
        return key, kv

    def _from_disk(self, key: str, tokens: int) -> ImageKV | None:
        arrays = self.feature_cache.load(key) if self.feature_cache else None
        if arrays is None:
            return None
        try:
            kv = ImageKV.empty(self.cross_backends, self.vision.hp, tokens, self.vision.kv_type)
        except ggml.DeviceError as exc:
            raise ModelError(f"the image cannot be kept on its device: {exc}") from None
        try:
            kv.load_arrays(arrays)
        except (KeyError, ValueError):                # an entry from another layout: encode instead
            kv.close()
            return None
        return kv

    def _evict(self) -> None:
        in_use = self.in_use()
        for key in list(self._kept):
            if len(self._kept) <= IMAGE_CACHE_SIZE:
                break
            if all(self._kept[key] is not image for image in in_use):
                self._kept.pop(key).close()

    def close(self) -> None:
        for kv in self._kept.values():
            kv.close()
        self._kept.clear()
