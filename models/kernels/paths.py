"""How each of the vision tower's and the decoder's hot ops runs: the paths, as values.

A `KernelPath` is an arithmetic (what the op rounds its operands to) and where it runs: on one of lva's CPU
kernels at an instruction set, or as ggml's own op (`isa` None), which every backend has. `Paths` holds
one per op. Which ones run is decided once, by measurement (calibration.py), or forced by name through
the environment (`forced_paths`), and then handed as values to the graph builders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from models.errors import LvaError

class KernelError(LvaError):
    """A path asked for by name that this machine cannot run; the message is one line."""


class Isa(Enum):
    """Instruction sets of lva's kernels (the numbers are the C library's `enum lva_isa`)."""

    REFERENCE = 0        # scalar C: the tests' yardstick, never chosen by measurement
    AVX2 = 1             # AVX2 + FMA + F16C, 8 lanes
    AVX512 = 2           # AVX-512 F/BW/DQ/VL + VNNI, 16 lanes
    AVX512_BF16 = 3      # the same with AVX512_BF16's dot products

    def __str__(self) -> str:
        return self.name.lower()


class Arithmetic(Enum):
    """What a path rounds the operands of its products to (the numbers: the C library's `lva_arithmetic`)."""

    F32 = 0              # nothing
    INT16 = 1            # 13-14-bit integers with a scale per 64 values (or per row)
    INT8 = 2             # 8-bit weights, inputs spread over 0..255, with a scale per 64 values
    BF16 = 3             # BF16
    F16 = 4              # ggml's flash attention: K and V to F16
    STORED = 5           # ggml's product of the weights as the file stores them (F16: activations to F16)

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class KernelPath:
    """One way to run an op: lva's kernel in `arithmetic` on `isa`, or ggml's own op when `isa` is None."""

    arithmetic: Arithmetic
    isa: Isa | None = None

    @property
    def ours(self) -> bool:
        return self.isa is not None

    def __str__(self) -> str:
        if self.isa is None:
            return "ggml" if self.arithmetic is Arithmetic.STORED else f"ggml-{self.arithmetic}"
        return f"{self.arithmetic}@{self.isa}"

    @classmethod
    def parse(cls, text: str) -> KernelPath:
        """The path `str` wrote (ValueError for anything else)."""
        if text == "ggml":
            return cls(Arithmetic.STORED)
        if text.startswith("ggml-"):
            return cls(Arithmetic[text.removeprefix("ggml-").upper()])
        arithmetic, _, isa = text.partition("@")
        try:
            return cls(Arithmetic[arithmetic.upper()], Isa[isa.upper()])
        except KeyError:
            raise ValueError(f"not a path: {text!r}") from None


# ggml's own ops, by the op they stand in for.
GGML_EXACT_ATTENTION = KernelPath(Arithmetic.F32)      # F32 products and ggml's softmax: the F32 tower's
GGML_FLASH_ATTENTION = KernelPath(Arithmetic.F16)      # ggml's flash attention, F16 K/V: any backend
GGML_PRODUCTS = KernelPath(Arithmetic.STORED)
GGML_BF16_PRODUCTS = KernelPath(Arithmetic.BF16)       # ggml's product of BF16 copies of F16 weights
GGML_GELU_ERF = KernelPath(Arithmetic.F32)             # exact: the F32 tower's
GGML_GELU_TANH = KernelPath(Arithmetic.F16)            # ggml's F16 table of the tanh form
GGML_CROSS_ATTENTION = KernelPath(Arithmetic.STORED)   # ggml's ops over the K/V as stored


@dataclass(frozen=True)
class Paths:
    """The path of each op: the encoder's attention, its matrix products, the MLP's down product (apart:
    its inputs are GELU's outputs, nearly all >= -0.17, which INT8 rounds twice as finely as the others'),
    and GELU, and a decoded token's cross-attention over an image's K/V."""

    attention: KernelPath
    products: KernelPath
    mlp_down: KernelPath
    gelu: KernelPath
    cross_attention: KernelPath

    def __str__(self) -> str:
        return (f"attention {self.attention}, products {self.products}, MLP down {self.mlp_down}, "
                f"GELU {self.gelu}, cross-attention {self.cross_attention}")


GGML_PATHS = Paths(GGML_FLASH_ATTENTION, GGML_PRODUCTS, GGML_PRODUCTS, GGML_GELU_TANH, GGML_CROSS_ATTENTION)
EXACT_PATHS = Paths(GGML_EXACT_ATTENTION, GGML_PRODUCTS, GGML_PRODUCTS, GGML_GELU_ERF, GGML_CROSS_ATTENTION)

ATTENTION_ENVIRONMENT = "LVA_ATTENTION"
PRODUCTS_ENVIRONMENT = "LVA_PRODUCTS"            # every product, the MLP's down product too
MLP_DOWN_ENVIRONMENT = "LVA_MLP_DOWN"            # the MLP's down product alone
# What each variable's values name: a path, or an arithmetic whose instruction set is measured.
ATTENTION_NAMES: dict[str, KernelPath | Arithmetic] = {
    "ggml": GGML_FLASH_ATTENTION, "f32": Arithmetic.F32, "int16": Arithmetic.INT16, "bf16": Arithmetic.BF16,
    "reference": KernelPath(Arithmetic.F32, Isa.REFERENCE)}
PRODUCTS_NAMES: dict[str, KernelPath | Arithmetic] = {
    "ggml": GGML_PRODUCTS, "ggml-bf16": GGML_BF16_PRODUCTS, "f32": Arithmetic.F32, "int16": Arithmetic.INT16,
    "int8": Arithmetic.INT8}


def parse(value: str, names: Mapping[str, KernelPath | Arithmetic], variable: str) -> KernelPath | Arithmetic:
    """`NAME` or `NAME@ISA` (int16@avx2): a path, or an arithmetic whose instruction set is left to measure."""
    name, _, isa = value.strip().lower().partition("@")
    if name not in names:
        isas = "|@".join(map(str, Isa))
        raise KernelError(f"{variable}={value} is not one of {', '.join(names)} (optionally @{isas})")
    chosen = names[name]
    if not isa:
        return chosen
    try:
        wanted = Isa[isa.upper()]
    except KeyError:
        raise KernelError(f"{variable}={value}: {isa} is not one of {', '.join(map(str, Isa))}") from None
    if isinstance(chosen, KernelPath) and not chosen.ours:
        raise KernelError(f"{variable}={value}: ggml's ops take no instruction set")
    return KernelPath(chosen if isinstance(chosen, Arithmetic) else chosen.arithmetic, wanted)


Forced = KernelPath | Arithmetic | None


def forced(environment: Mapping[str, str] = os.environ) -> dict[str, Forced]:
    """What the environment forces, by op (None where unset): a path, or an arithmetic. `LVA_PRODUCTS`
    names every product's, `LVA_MLP_DOWN` the MLP's down product's alone (it wins for that one)."""
    def named(variable: str, names: Mapping[str, KernelPath | Arithmetic]) -> Forced:
        value = environment.get(variable, "").strip()
        return parse(value, names, variable) if value else None
    products = named(PRODUCTS_ENVIRONMENT, PRODUCTS_NAMES)
    return {"attention": named(ATTENTION_ENVIRONMENT, ATTENTION_NAMES), "products": products,
            "mlp_down": named(MLP_DOWN_ENVIRONMENT, PRODUCTS_NAMES) or products}
