"""Quantize: fp32/fp16/bf16 -> packed 4-bit codes + absmax, then the optional 8-bit double quantization.

Two launches and one torch reduction: the 4-bit pass (reads 2 bytes, writes 0.5 byte per bf16 param: the
floor), the float64 mean of absmax done by torch (the same on every device), then the nested pass over absmax
(1/blocksize of the elements). Every rounding step mirrors ``nf4.format``, so the bytes are equal.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from nf4 import codebook, format
from nf4.kernels.common import flush, interpreted, reciprocal_approx

# 8 elements a thread (8 warps): on an H200 the 4-bit pass of a 28672x8192 bf16 weight took 0.289 ms at 2048
# elements a program, 0.319 at 4096 (the 128-bucket encoder: 0.383 / 0.426, 0.437 at 1024, 0.630 at 8192).
_ELEMENTS_PER_PROGRAM = 2048


# Codes of scaled values y in [-1, 1] (NaN, from an all-zero block, gives 0 as every comparison is false):
#   nf4/int4: code = #{thresholds t : y > t}                       (ties to the lower code)
#   fp4:      code = code_of_rank[#{t : |y| > t}] | (y < 0) << 3  (sign-magnitude)
# nf4/int4 look the count up: y falls in one of 2*BUCKETS equal buckets over [-1, 1) (ends clamped), and
#   code = below[b] + (y > first[b])
# where below[b] counts the thresholds under bucket b's window and first[b] is the (at most one) threshold
# inside it (+inf if none). The window is the bucket widened by 2**-20 on each side, far more than the fp32
# rounding of the bucket arithmetic can move y across an edge, so the count is exact for every y (tables: _tables).
# The bucket is read off the bits of (v - 0.5) + 1.5 * 2**23 (v = (y + 1) * BUCKETS clamped, NaN to 0): no
# float->int conversion, which issues at a quarter of the FMA rate. fp4 counts its 7 magnitude thresholds.
@triton.jit
def _encode(y, tables_ptr, NTHRESHOLDS: tl.constexpr, SIGN_MAGNITUDE: tl.constexpr, BUCKETS: tl.constexpr):
    if SIGN_MAGNITUDE:
        v = tl.abs(y)
        rank = tl.zeros(y.shape, tl.int32)
        for i in tl.static_range(NTHRESHOLDS):
            rank += (v > tl.load(tables_ptr + i).to(tl.float32, bitcast=True)).to(tl.int32)
        code = tl.load(tables_ptr + NTHRESHOLDS + rank) | ((y < 0).to(tl.int32) << 3)
    else:
        NB: tl.constexpr = 2 * BUCKETS
        v = tl.minimum(tl.maximum(y * BUCKETS + BUCKETS, 0.0), NB - 0.25)  # max(NaN, 0) = 0
        b = ((v - 0.5) + 12582912.0).to(tl.int32, bitcast=True) & 0xFF  # round(v - 0.5): floor(v), or one below
        flat = tl.reshape(b, (y.numel,))  # at an exact edge, which that bucket's window covers
        i = tl.arange(0, NB)
        below = tl.reshape(tl.gather(tl.load(tables_ptr + i), flat, 0), y.shape)
        first = tl.reshape(tl.gather(tl.load(tables_ptr + NB + i), flat, 0), y.shape).to(tl.float32, bitcast=True)
        code = below + (y > first).to(tl.int32)
    return code


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# A program quantizes NB whole blocks, loaded as [NB, BS] (16-byte loads along a block), then split into pairs
# (2j, 2j+1) for the high and low nibble of byte j.   x <- flush(x);  absmax_b = max |x| over block b (NaN if any
# x is);  y = x * rcp(absmax_b), flushed where the sign is coded (fp4; a subnormal y codes as 0 everywhere else).
# Compiled for sm_90 (nf4, bf16, 8 warps; ptxas 13.4 offline): 16-byte loads, 312 instructions a thread for its 8
# elements with the 32-bucket lookup (352 with the earlier 128 buckets and three gathers; the first version had
# 2-byte loads, 15 comparisons and 256 shuffles a thread). On an H200 the encode is a third of the time: with it
# replaced by a cheap function the pass takes 1.41x its floor, with it 2.09x (28672x8192, docs/BENCHMARKS.md).
@triton.jit
def _quantize_kernel(
    x_ptr,
    tables_ptr,
    rcp_delta_ptr,
    data_ptr,
    absmax_ptr,
    n,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    NTHRESHOLDS: tl.constexpr,
    SIGN_MAGNITUDE: tl.constexpr,
    BUCKETS: tl.constexpr,
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
    code = _encode(flush(y) if SIGN_MAGNITUDE else y, tables_ptr, NTHRESHOLDS, SIGN_MAGNITUDE, BUCKETS)
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


# Buckets a side of 0 in the nf4/int4 lookup: 1/16 wide, narrower than any gap between two thresholds (nf4's
# smallest: 0.0805), so a window holds at most one; 32 entries a table, one per shared-memory bank.
_BUCKETS = 16
_WINDOW = 2.0**-20
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _bucket_tables(thresholds: list[float]) -> torch.Tensor:
    """int32 [2, 2*_BUCKETS]: below, then first as fp32 bits, of every bucket (see _encode)."""
    nb = 2 * _BUCKETS
    below = torch.zeros(nb, dtype=torch.int32)
    first = torch.full((nb,), float("inf"), dtype=torch.float32)
    for b in range(nb):
        lo = -math.inf if b == 0 else b / _BUCKETS - 1 - _WINDOW
        hi = math.inf if b == nb - 1 else (b + 1) / _BUCKETS - 1 + _WINDOW
        ts = [t for t in thresholds if lo <= t < hi]  # float64 comparisons of the exact fp32 thresholds
        assert len(ts) <= 1, (b, ts)
        below[b] = sum(t < lo for t in thresholds)
        first[b] = ts[0] if ts else float("inf")
    return torch.stack([below, first.view(torch.int32)])


def _tables(quant_type: str, device: torch.device) -> torch.Tensor:
    """The encoder's int32 table on ``device``, made once per device: fp4, its 7 thresholds (fp32 bits) then
    code_of_rank[8]; nf4/int4, the bucket tables (format's exact fp32 thresholds, compared in fp32)."""
    key = (quant_type, device)
    if key not in _TABLES:
        if quant_type == "fp4":
            thresholds = torch.tensor(codebook.FP4_MAGNITUDE_THRESHOLDS, dtype=torch.float32).view(torch.int32)
            table = torch.cat([thresholds, torch.tensor(codebook.FP4_CODE_OF_RANK, dtype=torch.int32)])
        else:
            table = _bucket_tables(format._thresholds(quant_type, torch.device("cpu")).tolist()).flatten()
        _TABLES[key] = table.to(device)
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
    nb = max(1, _ELEMENTS_PER_PROGRAM // blocksize)
    wrap_triton(_quantize_kernel)[(triton.cdiv(nblocks, nb),)](
        tensor,
        _tables(quant_type, tensor.device),
        _rcp_delta(tensor.device),
        data,
        absmax,
        n,
        nblocks,
        BLOCKSIZE=blocksize,
        NB=nb,
        NTHRESHOLDS=len(codebook.FP4_MAGNITUDE_THRESHOLDS),
        SIGN_MAGNITUDE=quant_type == "fp4",
        BUCKETS=_BUCKETS,
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
