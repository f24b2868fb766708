"""Image encoding timed: cold encodes, the stages of the fastest (from the encoder's progress callback), and an
in-memory cache hit."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from synthetic_pair import make_image

SEEDS_PER_RUN = 1000                 # run r of the image with seed s uses seed s + r * SEEDS_PER_RUN


@dataclass
class Encode:
    """One image: cold encode times (cache cleared before each), a cache hit, and the stages of the best run."""

    label: str
    size: tuple[int, int]
    tiles: int
    image_tokens: int
    seconds: list[float]
    cached_seconds: float
    stages: list[tuple[str, float]]  # (stage, seconds) of the fastest cold run

    @property
    def best(self) -> float:
        return min(self.seconds)


def measure_encode(model, label: str, size: tuple[int, int], seed: int, runs: int) -> tuple[Encode, Image.Image]:
    """Cold encodes of `runs` new images of `size`, the stages of the fastest, a cache hit; and the last image,
    which stays encoded for the decode runs.

    Each run encodes an image new to the model (random pixels, from its own seed: the cost does not depend
    on them), so every run is cold without reaching into the runtime's cache. The progress callback fires
    after preprocessing and after each stage of `models.mllama.vision.encode` (embeddings, each local
    layer, each global layer, projection + cross-layer K/V), so differences of its timestamps show where
    the time goes. The cache hit is the last image encoded again.
    """
    seconds: list[float] = []
    best_stages: list[tuple[str, float]] = []
    for run in range(runs):
        image = make_image(*size, seed=seed + SEEDS_PER_RUN * run)
        tiles = model.preprocess(image).num_tiles
        stamps: list[float] = []
        started = time.perf_counter()
        _, kv = model.encode_image(image, progress=lambda _what, _fraction: stamps.append(time.perf_counter()))
        elapsed = time.perf_counter() - started
        if not seconds or elapsed < min(seconds):
            best_stages = _stages(model, started, stamps)
        seconds.append(elapsed)
        print(f"encode {label} ({image.size[0]}x{image.size[1]}, {tiles} tiles), run {run + 1}: {elapsed:.1f} s",
              flush=True)
    started = time.perf_counter()
    model.encode_image(image)
    cached = time.perf_counter() - started
    return Encode(label, image.size, tiles, kv.num_tokens, seconds, cached, best_stages), image


def _stages(model, started: float, stamps: list[float]) -> list[tuple[str, float]]:
    v = model.vision.hp.vision
    names = (["preprocessing", "embeddings"] + [f"local {i}" for i in range(v.num_hidden_layers)]
             + [f"global {i}" for i in range(v.num_global_layers)] + ["projection + cross-layer K/V"])
    times = np.diff([started, *stamps])
    return list(zip(names, times.tolist()))
