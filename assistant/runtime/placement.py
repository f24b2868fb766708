"""Where each part of a model runs: llama.cpp's text layers, the vision tower, each cross-attention layer.

llama.cpp places the text layers (`n_gpu_layers`: the last N layers, the output layer counting as one, go
to its devices, split between several by their free memory; the token embeddings stay on the CPU) and
logs each choice. lva reads that log instead of repeating llama.cpp's arithmetic, and places its own
parts after it:

- a cross-attention layer runs on the device of the self-attention layer it follows (the CPU for one
  that acts on the token embeddings), so `--gpu-layers` sizes lva's layers together with llama.cpp's,
  and the hook's rows and the layer's weights share a device;
- the vision tower runs on the first device llama.cpp offloads to, or on the CPU when nothing is
  offloaded; the image side of every cross layer (its K and V projections, run once per image) goes
  with it;
- an image's K/V for a cross layer are kept on that layer's device (copied there once per image).

Every device computes the same graphs, so the placement moves work and memory, never the semantics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from models.mllama.weights import IMAGE_SIDE_CROSS_TENSORS, cross_layer_of

CPU = "CPU"
LAYER_LOG = re.compile(r"load_tensors: layer +(\d+) assigned to device (\S+?),")


def self_layer_before(cross_layers: list[int]) -> dict[int, int]:
    """Cross layer stack index -> the self-attention layer it follows in the text file (-1: the embeddings).

    A cross layer at stack index c follows self layer c - (cross layers before c) - 1.
    """
    return {index: index - before - 1 for before, index in enumerate(sorted(cross_layers))}


@dataclass(frozen=True)
class Placement:
    """Device names (as ggml names them: CPU, CUDA0, Metal, RPC0, ...) of every part of a model."""

    text_layers: tuple[str, ...]         # self-attention layer i of the text file
    output: str                          # final norm and lm_head
    vision: str                          # the vision tower and the image side of the cross layers
    cross_layers: dict[int, str]         # cross layer stack index -> its token side and its image K/V

    @classmethod
    def from_llama_log(cls, lines: list[str], n_layer: int) -> Placement:
        """Read llama.cpp's `load_tensors: layer N assigned to device D` lines (layer n_layer is the output);
        the cross layers come with `with_cross_layers`, once the vision file is read."""
        assigned: dict[int, str] = {}
        for line in lines:
            match = LAYER_LOG.search(line)
            if match:
                assigned[int(match.group(1))] = match.group(2)
        if sorted(assigned) != list(range(n_layer + 1)):
            raise RuntimeError(f"llama.cpp did not log where its {n_layer} layers went "
                               f"(got {sorted(assigned)}); was llama-cpp-python upgraded?")
        text = tuple(assigned[i] for i in range(n_layer))
        offloaded = [device for device in (*text, assigned[n_layer]) if device != CPU]
        return cls(text, assigned[n_layer], offloaded[0] if offloaded else CPU, {})

    def with_cross_layers(self, cross_layers: list[int]) -> Placement:
        cross = {index: CPU if layer < 0 else self.text_layers[layer]
                 for index, layer in self_layer_before(cross_layers).items()}
        return replace(self, cross_layers=cross)

    def device_of_vision_tensor(self, name: str) -> str:
        """Where a tensor of the vision file lives: a cross layer's token side with its layer, the rest with the
        tower."""
        index, field = cross_layer_of(name)
        if index is None or field in IMAGE_SIDE_CROSS_TENSORS:
            return self.vision
        return self.cross_layers[index]

    def summary(self) -> str:
        """One line for a status bar: the device of the text layers (each with its share when they are split),
        and the vision tower's when it is elsewhere."""
        holders = list(dict.fromkeys(self.text_layers))
        if len(holders) == 1:
            parts = holders
        else:
            parts = [f"{device} {self.text_layers.count(device)}/{len(self.text_layers)} layers" for device in holders]
        if self.cross_layers and self.vision not in holders:
            parts.append(f"vision {self.vision}")
        return " + ".join(parts)

    def describe(self) -> list[str]:
        """Lines for `lva info --model`: text layers per device, output, vision tower, cross layers."""
        lines = []
        for device in dict.fromkeys(self.text_layers):
            layers = [i for i, d in enumerate(self.text_layers) if d == device]
            lines.append(f"text layers {_ranges(layers)} ({len(layers)} of {len(self.text_layers)}): {device}")
        lines.append(f"output layer: {self.output}    token embeddings: {CPU}")
        if self.cross_layers:                                  # a pair, not a plain text model
            lines.append(f"vision tower (and the K/V projections of the cross layers): {self.vision}")
            for index, device in sorted(self.cross_layers.items()):
                lines.append(f"cross-attention layer {index} (and its image K/V): {device}")
        return lines


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
