"""Pieces shared by the kernels: exact fp32 arithmetic and the per-block absmax decode."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice


def interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``, where libdevice calls do not exist (numpy rounds each op anyway)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The compiler contracts a * b + c into one fma (one rounding) unless the multiply is an explicit
# round-to-nearest instruction; the format rounds twice, so exact paths go through these helpers.
@triton.jit
def mul_rn(a, b, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


# 1 / x as bitsandbytes' fast-math CUDA kernels compute it: rcp.approx.ftz.f32 (within 1 ulp, not correctly
# rounded). Interpreted, it is rebuilt as format does: 1/x correctly rounded, moved by the tabulated ulp
# deviation of x's mantissa (rcp_delta_ptr, int32 [2**23]); 0 -> inf, x > 2**126 -> 0 (flushed).
@triton.jit
def reciprocal_approx(x, rcp_delta_ptr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        bits = (1.0 / x).to(tl.int32, bitcast=True)
        bits += tl.load(rcp_delta_ptr + (x.to(tl.int32, bitcast=True) & 0x7FFFFF))
        r = bits.to(tl.float32, bitcast=True)
        r = tl.where(x == 0, float("inf"), r)
        return tl.where(x > 2.0**126, 0.0, r).to(tl.float32)
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


# Subnormal fp32 -> 0, as the fast-math (FTZ) code that wrote the reference bytes does.
@triton.jit
def flush(x):
    return tl.where(tl.abs(x) < 1.1754943508222875e-38, 0.0, x).to(tl.float32)


# absmax of 4-bit block b (any int tensor of block indices, masked lanes read block 0):
#   plain:        absmax[b]                                               (fp32)
#   double quant: flush(nested_quant_map[absmax[b]] * nested_absmax[b // 256]) + offset   (two fp32 roundings)
# The offset is read from memory (a 0-d fp32 tensor), not passed by value: a per-weight Python float would make
# torch.compile specialize the graph on it, one compile per layer.
@triton.jit
def load_absmax(
    absmax_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    nested_offset_ptr,
    b,
    mask,
    DOUBLE_QUANT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + b // 256, mask=mask, other=0.0)
        return flush(mul_rn(tl.load(nested_quant_map_ptr + code), scale, INTERPRETED)) + tl.load(nested_offset_ptr)
    else:
        return tl.load(absmax_ptr + b, mask=mask, other=0.0)


# fp32 -> out_ptr's dtype, rounded to nearest even. The interpreter's own bf16 cast truncates, so there the
# rounding is done on the bits: add 0x7FFF plus the lowest kept bit, keep the high half (finite inputs only).
@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
