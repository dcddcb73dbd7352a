"""GGUF quantization types: one table for the recipe's check, llama-quantize's names, the file type the GGUF
records and the disk estimate. An unknown type is an error everywhere, never a guess."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tutor_wrap.core.errors import TutorWrapError


@dataclass(frozen=True)
class QuantType:
    name: str            # llama-quantize's name
    file_type: int       # general.file_type in the GGUF (llama.cpp's LLAMA_FTYPE enum)
    size_ratio: float    # size as a fraction of the f16 GGUF (bits per weight / 16, rounded up for the 16-bit
                         # tensors that k-quants keep): only for checking free disk before writing


_TABLE = (
    QuantType("F32", 0, 2.0), QuantType("F16", 1, 1.0), QuantType("BF16", 32, 1.0),
    QuantType("Q8_0", 7, 0.55), QuantType("Q6_K", 18, 0.43),
    QuantType("Q5_K_M", 17, 0.37), QuantType("Q5_K_S", 16, 0.36), QuantType("Q5_0", 8, 0.36), QuantType("Q5_1", 9, 0.39),
    QuantType("Q4_K_M", 15, 0.32), QuantType("Q4_K_S", 14, 0.30), QuantType("Q4_0", 2, 0.29), QuantType("Q4_1", 3, 0.32),
    QuantType("IQ4_NL", 25, 0.30), QuantType("IQ4_XS", 30, 0.28),
    QuantType("Q3_K_L", 13, 0.28), QuantType("Q3_K_M", 12, 0.26), QuantType("Q3_K_S", 11, 0.23), QuantType("Q2_K", 10, 0.21),
)
TYPES: dict[str, QuantType] = {q.name: q for q in _TABLE}
# What a recipe may ask llama-quantize for: the quantized types (the f16/bf16/f32 GGUF is always written first).
QUANT_TYPES: tuple[str, ...] = tuple(q.name for q in _TABLE if q.name not in ("F32", "F16", "BF16"))


def quant_type(name: str) -> QuantType:
    """The table row for `name` (case-insensitive); TutorWrapError naming the nearest known type otherwise."""
    up = name.upper()
    if up in TYPES:
        return TYPES[up]
    near = difflib.get_close_matches(up, QUANT_TYPES, n=1)
    raise TutorWrapError(f"unknown quant type {name!r}" + (f" (did you mean {near[0]}?)" if near else ""),
                         hint=f"known: {', '.join(QUANT_TYPES)}")
