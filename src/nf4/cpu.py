"""Fused CPU paths: the reference format's chunk steps compiled by TorchInductor into vectorized C++ loops.

The eager reference in ``format.py`` makes ~10 passes over each chunk, and ``torch.bucketize`` alone costs
~15 ns an element; compiled, the codes come from one vectorized pass (15 comparisons summed) and the
packing from another over an int16 view. Results are bit-identical to the reference (tests/test_cpu.py).
Used for CPU tensors of at least ``MIN_ELEMENTS`` when a C++ compiler is found; ``NF4_NO_COMPILE=1`` turns
it off. The first call per (dtype, quant_type) compiles (~10-30 s; Inductor caches it on disk).
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings

import torch

from nf4 import codebook
from nf4 import format as fmt

MIN_ELEMENTS = 1 << 18
# The 8-bit encoder (double quantization) is a 7-step search of ~40 eager ops: compiled it wins from ~1k values
# (4096 absmax values: 2.4 ms eager, 0.2 ms compiled; 13,824, a 576x1536 weight's: 8.1 vs 0.24 ms).
ENCODE_8BIT_MIN_ELEMENTS = 1 << 12


@functools.cache
def available() -> bool:
    """Not disabled, and a C++ compiler for Inductor's CPU backend exists."""
    if os.environ.get("NF4_NO_COMPILE", "") not in ("", "0") or sys.byteorder != "little":
        return False
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def usable(t: torch.Tensor, min_elements: int = MIN_ELEMENTS) -> bool:
    return t.device.type == "cpu" and t.numel() >= min_elements and available()


def _absmax(x: torch.Tensor) -> torch.Tensor:
    """x [rows, blocksize] -> fp32 [rows], subnormals flushed first."""
    x = x.float()
    return torch.where(x.abs() < fmt.FLT_MIN, 0.0, x).abs().amax(dim=1)


def _codes(x: torch.Tensor, r: torch.Tensor, thresholds: tuple[float, ...]) -> torch.Tensor:
    """x [rows, blocksize], r = 1/absmax [rows] -> uint8 codes, as format._encode_4bit for ascending levels."""
    x = x.float()
    y = torch.where(x.abs() < fmt.FLT_MIN, 0.0, x) * r[:, None]
    code = torch.zeros_like(y, dtype=torch.int32)
    for t in thresholds:  # NaN (an all-zero block) compares false everywhere: code 0
        code = code + (y > t).int()
    return code.to(torch.uint8)


def _codes_fp4(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """As _codes for bitsandbytes' sign-magnitude FP4 (flushed y, so a subnormal negative is +0)."""
    x = x.float()
    y = torch.where(x.abs() < fmt.FLT_MIN, 0.0, x) * r[:, None]
    y = torch.where(y.abs() < fmt.FLT_MIN, 0.0, y)
    rank = torch.zeros_like(y, dtype=torch.int32)
    for t in codebook.FP4_MAGNITUDE_THRESHOLDS:
        rank = rank + (y.abs() > t).int()
    half = rank // 2  # magnitude code of each rank, without a gather: ranks 2,3 -> +4, ranks 6,7 -> -4
    code = rank + 4 * (half == 1).int() - 4 * (half == 3).int()
    return (code + 8 * (y < 0).int()).to(torch.uint8)


def _pack(pairs: torch.Tensor) -> torch.Tensor:
    """int16 view of uint8 codes (little-endian: first code in the low byte) -> packed uint8."""
    return (((pairs & 15) << 4) | (pairs >> 8)).to(torch.uint8)


def _decode16(codes: torch.Tensor, absmax: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype):
    """codes uint8 [rows, blocksize/2] -> int32 [rows, blocksize/2], each word two 16-bit outputs.

    hi/lo: fp32 [256], the level of each byte's high/low nibble. Building the little-endian word (first
    element in the low half) keeps every store contiguous, which is what lets Inductor vectorize it.
    """
    i = codes.int()
    first = hi[i] * absmax[:, None]
    second = lo[i] * absmax[:, None]
    first = torch.where(first.abs() < fmt.FLT_MIN, 0.0, first).to(dtype).view(torch.int16).int() & 0xFFFF
    second = torch.where(second.abs() < fmt.FLT_MIN, 0.0, second).to(dtype).view(torch.int16).int()
    return first | (second << 16)


def _decode32(codes: torch.Tensor, absmax: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """codes uint8 [rows, blocksize/2] -> fp32 [rows, blocksize]."""
    i = codes.int()
    v = torch.stack([hi[i], lo[i]], dim=-1).view(codes.shape[0], -1) * absmax[:, None]
    return torch.where(v.abs() < fmt.FLT_MIN, 0.0, v)


_FUNCTIONS = {
    "absmax": _absmax,
    "codes": _codes,
    "codes_fp4": _codes_fp4,
    "pack": _pack,
    "encode_8bit": None,
    "decode16": _decode16,
    "decode32": _decode32,
}


@functools.cache
def _compiled(name: str):
    # Arguments vary in shape and dtype only, so each function compiles at most once per input dtype.
    # The table gathers index 256-entry tables with a uint8: in range by construction, so no bounds asserts.
    options = {"assert_indirect_indexing": False}
    return torch.compile(_FUNCTIONS[name] or fmt._encode_8bit, dynamic=True, options=options)


def quantize_blocks(x: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused equivalent of format._quantize_blocks + format._pack: x [rows, blocksize] -> (packed, absmax)."""
    absmax = _compiled("absmax")(x)
    fmt._check_finite(absmax)
    if quant_type == "fp4":
        codes = _compiled("codes_fp4")(x, fmt._reciprocal(absmax))
    else:  # thresholds as constants: one compile per (quant_type, dtype), 6 of dynamo's 8 per function
        thresholds = tuple(fmt._thresholds(quant_type, x.device).tolist())
        codes = _compiled("codes")(x, fmt._reciprocal(absmax), thresholds)
    return _compiled("pack")(codes.view(-1).view(torch.int16)), absmax


def dequantize_blocks(
    codes: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Fused equivalent of format.dequantize's chunk step: codes [rows, blocksize/2] -> [rows, blocksize]."""
    byte = torch.arange(256, device=codes.device)
    hi, lo = quant_map[byte >> 4].float(), quant_map[byte & 15].float()
    if dtype == torch.float32:
        return _compiled("decode32")(codes, absmax, hi, lo)
    return _compiled("decode16")(codes, absmax, hi, lo, dtype).view(dtype).view(codes.shape[0], -1)


def encode_8bit(y: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
    """Compiled format._encode_8bit (double quantization of large tensors)."""
    return _compiled("encode_8bit")(y, dyn)


def disable(err: Exception) -> None:
    """Fall back to the eager reference for the rest of the process after a compile failure."""
    warnings.warn(f"nf4: fused CPU path unavailable ({type(err).__name__}: {err}); using the eager path", stacklevel=3)
    os.environ["NF4_NO_COMPILE"] = "1"
    available.cache_clear()
