"""Quantize: fp32/fp16/bf16 -> packed 4-bit codes + absmax, then the optional 8-bit double quantization.

Two launches and one torch reduction: the 4-bit pass (reads 2 bytes, writes 0.5 byte per bf16 param: the
floor), the float64 mean of absmax done by torch (the same on every device), then the nested pass over absmax
(1/blocksize of the elements). Every rounding step mirrors ``nf4.format``, so the bytes are equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from nf4 import codebook, format
from nf4.kernels.common import flush, interpreted, reciprocal_approx

_ELEMENTS_PER_PROGRAM = 8192


# Codes of scaled values y in [-1, 1] (NaN, from an all-zero block, gives 0 as every comparison is false):
#   nf4/int4: code = #{thresholds t : y > t}                       (ties to the lower code)
#   fp4:      code = code_of_rank[#{t : |y| > t}] | (y < 0) << 3  (sign-magnitude)
# The count over the 15 sorted thresholds (int4's 14 padded with +inf) is a 4-step binary search: the threshold
# of each step picked by selects on the scalars, ~20 operations an element against ~45 for 15 comparisons.
@triton.jit
def _load4(ptr):
    return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)


@triton.jit
def _encode(y, thresholds_ptr, code_of_rank_ptr, NTHRESHOLDS: tl.constexpr, SIGN_MAGNITUDE: tl.constexpr):
    if SIGN_MAGNITUDE:
        v = tl.abs(y)
        rank = tl.zeros(y.shape, tl.int32)
        for i in tl.static_range(NTHRESHOLDS):
            rank += (v > tl.load(thresholds_ptr + i)).to(tl.int32)
        return tl.load(code_of_rank_ptr + rank) | ((y < 0).to(tl.int32) << 3)
    else:
        t0, t1, t2, t3 = _load4(thresholds_ptr)
        t4, t5, t6, t7 = _load4(thresholds_ptr + 4)
        t8, t9, t10, t11 = _load4(thresholds_ptr + 8)
        t12, t13, t14, _ = _load4(thresholds_ptr + 12)
        b3 = y > t7
        b2 = y > tl.where(b3, t11, t3)
        b1 = y > tl.where(b3, tl.where(b2, t13, t9), tl.where(b2, t5, t1))
        last = tl.where(
            b3,
            tl.where(b2, tl.where(b1, t14, t12), tl.where(b1, t10, t8)),
            tl.where(b2, tl.where(b1, t6, t4), tl.where(b1, t2, t0)),
        )
        b0 = y > last
        return b3.to(tl.int32) * 8 + b2.to(tl.int32) * 4 + b1.to(tl.int32) * 2 + b0.to(tl.int32)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# A program quantizes NB whole blocks, loaded as [NB, BS] (16-byte loads along a block), then split into pairs
# (2j, 2j+1) for the high and low nibble of byte j.   x <- flush(x);  absmax_b = max |x| over block b (NaN if any
# x is);  y = x * rcp(absmax_b), flushed where the sign is coded (fp4; a subnormal y codes as 0 everywhere else).
# Compiled for sm_90 (nf4, bf16, 8192 elements, 8 warps): 16-byte loads, ~43 instructions an element where the
# [NB, BS/2, 2] tile of the first version had 2-byte loads, 15 comparisons and 256 shuffles a thread.
@triton.jit
def _quantize_kernel(
    x_ptr,
    thresholds_ptr,
    code_of_rank_ptr,
    rcp_delta_ptr,
    data_ptr,
    absmax_ptr,
    n,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    NTHRESHOLDS: tl.constexpr,
    SIGN_MAGNITUDE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # [NB]
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [NB, BS]
    x = tl.load(x_ptr + elem, mask=elem < n, other=0.0).to(tl.float32)
    absmax = flush(tl.reduce(tl.abs(x), 1, _max_keeping_nan))  # [NB] = max |flush(x)|: flush is monotone
    # Flushing x changes a code only where a subnormal x meets an absmax under 2**-121: elsewhere |y| < 2**-5 and
    # gets the code of 0 either way. One test per program instead of 3 operations an element; fp4 codes the sign
    # of y, so it always flushes. (A NaN block can skip the flush: the op rejects NaN input.)
    if SIGN_MAGNITUDE or tl.min(absmax) < 2.0**-121:
        x = flush(x)
    y = x * reciprocal_approx(absmax, rcp_delta_ptr, INTERPRETED)[:, None]
    code = _encode(flush(y) if SIGN_MAGNITUDE else y, thresholds_ptr, code_of_rank_ptr, NTHRESHOLDS, SIGN_MAGNITUDE)
    high, low = tl.split(tl.reshape(code, (NB, HB, 2)))
    pair = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB] = byte index
    tl.store(data_ptr + pair, ((high << 4) | low).to(tl.uint8), mask=pair < (n + 1) // 2)
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)


# bitsandbytes' 8-bit encoder (format._encode_8bit): 7 halving steps of a binary search over the sorted
# 256-entry map from pivot 127, keeping the last pivot passed on each side, then a midpoint test between
# the final pivot and that neighbour (strict on both sides).
@triton.jit
def _encode_8bit(y, dyn_ptr):
    pivot = tl.full(y.shape, 127, tl.int32)
    lower_pivot = tl.zeros(y.shape, tl.int32)
    upper_pivot = tl.full(y.shape, 255, tl.int32)
    lower = tl.zeros(y.shape, tl.float32) + tl.load(dyn_ptr)
    upper = tl.zeros(y.shape, tl.float32) + tl.load(dyn_ptr + 255)
    val = tl.load(dyn_ptr + pivot)
    for s in tl.static_range(7):
        up = y > val
        lower_pivot = tl.where(up, pivot, lower_pivot)
        lower = tl.where(up, val, lower)
        upper_pivot = tl.where(up, upper_pivot, pivot)
        upper = tl.where(up, upper, val)
        pivot = tl.where(up, pivot + (64 >> s), pivot - (64 >> s))
        val = tl.load(dyn_ptr + pivot)
    above = tl.where(y > (upper + val) * 0.5, upper_pivot, pivot)
    below = tl.where(y < (lower + val) * 0.5, lower_pivot, pivot)
    return tl.where(y > val, above, below)


# One program per nested block of 256 absmax values:
#   c = flush(absmax - offset) (0 past the end);  nested_absmax = max |c|
#   code = encode_8bit(flush(c * rcp(nested_absmax)))
@triton.jit
def _double_quantize_kernel(
    absmax_ptr, offset_ptr, dyn_ptr, rcp_delta_ptr, codes_ptr, nested_absmax_ptr, nblocks, INTERPRETED: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64) * 256 + tl.arange(0, 256)
    mask = i < nblocks
    centered = flush(tl.where(mask, tl.load(absmax_ptr + i, mask=mask, other=0.0) - tl.load(offset_ptr), 0.0))
    nested_absmax = tl.max(tl.abs(centered), axis=0)
    y = flush(centered * reciprocal_approx(nested_absmax, rcp_delta_ptr, INTERPRETED))
    tl.store(codes_ptr + i, _encode_8bit(y, dyn_ptr).to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + tl.program_id(0), nested_absmax)


_TABLES: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(thresholds, code_of_rank) on ``device``: format's tables, copied once per device."""
    key = (quant_type, device)
    if key not in _TABLES:
        if quant_type == "fp4":
            thresholds = torch.tensor(codebook.FP4_MAGNITUDE_THRESHOLDS, dtype=torch.float32)
            code_of_rank = torch.tensor(codebook.FP4_CODE_OF_RANK, dtype=torch.int32)
        else:  # padded to 16 with +inf (int4 has 14): no y is above it; the 16th is never compared
            thresholds = format._thresholds(quant_type, torch.device("cpu"))
            thresholds = torch.cat([thresholds, torch.full((16 - thresholds.numel(),), float("inf"))])
            code_of_rank = torch.zeros(1, dtype=torch.int32)
        _TABLES[key] = (thresholds.to(device), code_of_rank.to(device))
    return _TABLES[key]


def _rcp_delta(device: torch.device) -> torch.Tensor:
    """The interpreter's reciprocal table (format's); compiled kernels use the instruction and never read it."""
    return format._rcp_delta(device) if interpreted() else torch.empty(1, dtype=torch.int32, device=device)


def quantize_4bit(tensor: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(data uint8 [(n+1)//2, 1], absmax fp32 [nblocks]) of a contiguous float tensor; NaN/Inf are not checked."""
    n = tensor.numel()
    nblocks = triton.cdiv(n, blocksize)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=tensor.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=tensor.device)
    thresholds, code_of_rank = _tables(quant_type, tensor.device)
    nb = max(1, _ELEMENTS_PER_PROGRAM // blocksize)
    wrap_triton(_quantize_kernel)[(triton.cdiv(nblocks, nb),)](
        tensor,
        thresholds,
        code_of_rank,
        _rcp_delta(tensor.device),
        data,
        absmax,
        n,
        nblocks,
        BLOCKSIZE=blocksize,
        NB=nb,
        NTHRESHOLDS=thresholds.numel(),
        SIGN_MAGNITUDE=quant_type == "fp4",
        INTERPRETED=interpreted(),
        num_warps=8,
    )
    return data, absmax


def double_quantize(absmax: torch.Tensor, dynamic_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset fp32 0-d) of an fp32 absmax."""
    nblocks = absmax.numel()
    offset = absmax.double().mean().float()  # torch, not a kernel: one rounding of the float64 mean everywhere
    codes = torch.empty(nblocks, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(triton.cdiv(nblocks, 256), dtype=torch.float32, device=absmax.device)
    wrap_triton(_double_quantize_kernel)[(nested_absmax.numel(),)](
        absmax,
        offset,
        dynamic_map,
        _rcp_delta(absmax.device),
        codes,
        nested_absmax,
        nblocks,
        INTERPRETED=interpreted(),
        num_warps=4,
    )
    return codes, nested_absmax, offset
