"""Quantize: fp32/fp16/bf16 -> packed 4-bit codes + absmax, then the optional 8-bit double quantization.

Three launches: the 4-bit pass (reads 2 bytes, writes 0.5 byte per bf16 param: the floor), float64 partial sums
of absmax, then the nested pass over absmax (1/blocksize of the elements), whose programs each finish the mean.
Every rounding step mirrors ``nf4.format``, so the bytes are equal.

What the H200 runs taught (docs/BENCHMARKS_GPU.md, "Eleventh session"): the first version of the 4-bit pass was
bound by instructions (272 a thread for 8 elements: 0.289 ms on 28672x8192, 2.1x its floor). Multiplying by the
reciprocal with flush-to-zero (no flush test), one 64-bit table entry a lookup, per-block masks (vector code
stores) and 32 elements a thread took it to 20 instructions an element and 0.178-0.187 ms; cutting a further 25% of
its instructions then changed nothing, nor did a persistent, prefetching loop (slower): what is left is the
memory side. torch's float64 mean of absmax and the double-quant kernel took 0.048 ms; the partial sums (0.005) and
the kernel with 4 nested blocks a program (each adding the 256 sums), 0.026.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from nf4 import codebook, format
from nf4.kernels.common import flush, interpreted, reciprocal_approx

# 32 elements a thread (2 warps). H200, 28672x8192 bf16, the 4-bit pass + double quant at elements a program /
# warps: 2048 / 2 0.2085 and 0.2101 ms (two runs), 4096 / 4 0.2123 and 0.2140, 4096 / 2 0.2079, 8192 / 4 0.2088,
# 8192 / 8 0.2132, 2048 / 8 (8 elements a thread) 0.2833 (docs/BENCHMARKS_GPU.md, "Eleventh session").
_ELEMENTS_PER_PROGRAM = 2048
_NUM_WARPS = 2
# The mean's first step: _SUM_PROGRAMS float64 partial sums, each over a chunk of absmax read _SUM_BLOCK values at
# a time; the double-quant kernel: _NESTED_PER_PROGRAM nested blocks (of 256) a program.
_SUM_PROGRAMS = 256
_SUM_BLOCK = 1024
_NESTED_PER_PROGRAM = 4


# Codes of scaled values y in [-1, 1] (NaN, from an all-zero block, gives 0 as every comparison is false):
#   nf4/int4: code = #{thresholds t : y > t}                       (ties to the lower code)
#   fp4:      code = code_of_rank[#{t : |y| > t}] | (y < 0) << 3  (sign-magnitude)
# nf4/int4 look the count up: y falls in one of 2*BUCKETS equal buckets over [-1, 1) and
#   code = below[b] + (y > first[b])
# where below[b] counts the thresholds under bucket b's window and first[b] is the (at most one) threshold
# inside it (+inf if none), one 64-bit table entry (below in the low word, first's fp32 bits in the high word).
# The window is the bucket widened by 2**-20 on each side, far more than the fp32 rounding of the bucket
# arithmetic can move y across an edge, so the count is exact for every y (tables: _tables). The bucket is
# round(v), v = max(y * BUCKETS + BUCKETS - 0.5, -0.5) (NaN to -0.5; y = 1 gives 2*BUCKETS, an entry that
# repeats the last bucket's), read off the bits of v + 1.5 * 2**23: no float->int conversion, which issues at a
# quarter of the FMA rate. fp4 counts its 7 magnitude thresholds.
@triton.jit
def _encode(y, tables_ptr, NTHRESHOLDS: tl.constexpr, SIGN_MAGNITUDE: tl.constexpr, BUCKETS: tl.constexpr):
    if SIGN_MAGNITUDE:
        v = tl.abs(y)
        rank = tl.zeros(y.shape, tl.int32)
        for i in tl.static_range(NTHRESHOLDS):
            rank += (v > tl.load(tables_ptr + i).to(tl.float32, bitcast=True)).to(tl.int32)
        code = tl.load(tables_ptr + NTHRESHOLDS + rank) | ((y < 0).to(tl.int32) << 3)
    else:
        NE: tl.constexpr = 4 * BUCKETS  # entries: the 2*BUCKETS buckets, then copies of the last
        v = tl.maximum(y * BUCKETS + (BUCKETS - 0.5), -0.5)  # max(NaN, -0.5) = -0.5
        b = (v + 12582912.0).to(tl.int32, bitcast=True) & (NE - 1)  # round(v): floor(y * B + B), or one below
        entries = tl.load(tables_ptr + tl.arange(0, NE))  # int64; one off at an exact edge
        entry = tl.reshape(tl.gather(entries, tl.reshape(b, (y.numel,)), 0), y.shape)
        first = (entry >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        code = entry.to(tl.int32) + (y > first).to(tl.int32)
    return code


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# x * r with fp32 subnormal inputs and result flushed to 0 (FTZ), as the fast-math code that wrote the reference
# bytes multiplies: one instruction, where flushing x first took a test and a select an element.
@triton.jit
def _mul_ftz(x, r, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        return flush(flush(x) * r)
    else:
        return tl.inline_asm_elementwise("mul.ftz.f32 $0, $1, $2;", "=r,r,r", [x, r], dtype=tl.float32,
                                         is_pure=True, pack=1)  # fmt: skip


# A program quantizes NB whole blocks, loaded as [NB, BS] (16-byte loads along a block), then split into pairs
# (2j, 2j+1) for the high and low nibble of byte j:
#   absmax_b = flush(max |x| over block b) (NaN if any x is; flushing x first would not change it)
#   y = mul_ftz(x, rcp(absmax_b))
# Masks are per block, so loads and stores stay 16 / 4 bytes wide; a partial last block is a second launch
# (PARTIAL) masked per element.
@triton.jit
def _quantize_kernel(
    x_ptr,
    tables_ptr,
    rcp_delta_ptr,
    data_ptr,
    absmax_ptr,
    n,
    first_block,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    NTHRESHOLDS: tl.constexpr,
    SIGN_MAGNITUDE: tl.constexpr,
    BUCKETS: tl.constexpr,
    PARTIAL: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB) + first_block  # [NB]
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [NB, BS]
    pair = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB] = byte index
    if PARTIAL:
        elem_mask = elem < n
        pair_mask = pair < (n + 1) // 2
    else:
        elem_mask = (blk < nblocks)[:, None]
        pair_mask = (blk < nblocks)[:, None]
    x = tl.load(x_ptr + elem, mask=elem_mask, other=0.0).to(tl.float32)
    absmax = flush(tl.reduce(tl.abs(x), 1, _max_keeping_nan))  # [NB]
    y = _mul_ftz(x, reciprocal_approx(absmax, rcp_delta_ptr, INTERPRETED)[:, None], INTERPRETED)
    code = _encode(y, tables_ptr, NTHRESHOLDS, SIGN_MAGNITUDE, BUCKETS)
    high, low = tl.split(tl.reshape(code, (NB, HB, 2)))
    tl.store(data_ptr + pair, ((high << 4) | low).to(tl.uint8), mask=pair_mask)
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


# The mean of absmax in two steps, each in a fixed order (so the offset is the same every run): program g adds
# its contiguous chunk of absmax (a multiple of BLOCK) in float64 to sums[g]; each double-quant program then adds
# the G sums itself.
@triton.jit
def _absmax_sums_kernel(absmax_ptr, sums_ptr, nblocks, chunk, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * chunk
    total = tl.zeros((BLOCK,), tl.float64)
    for j in range(0, chunk, BLOCK):
        i = start + j + tl.arange(0, BLOCK)
        total += tl.load(absmax_ptr + i, mask=i < nblocks, other=0.0).to(tl.float64)
    tl.store(sums_ptr + tl.program_id(0), tl.sum(total))


# A program takes NBN nested blocks of 256 absmax values (more elements a thread, to overlap the encoder's chain of
# dependent table loads):
#   offset = fp32(sum(sums) / nblocks) (stored by program 0)
#   c = flush(absmax - offset) (0 past the end);  nested_absmax = max |c| over the block
#   code = encode_8bit(flush(c * rcp(nested_absmax)))
@triton.jit
def _double_quantize_kernel(
    absmax_ptr, sums_ptr, dyn_ptr, rcp_delta_ptr, codes_ptr, nested_absmax_ptr, offset_ptr, nblocks,
    G: tl.constexpr, NBN: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    offset = (tl.sum(tl.load(sums_ptr + tl.arange(0, G))) / nblocks).to(tl.float32)
    if tl.program_id(0) == 0:
        tl.store(offset_ptr, offset)
    nested = tl.program_id(0).to(tl.int64) * NBN + tl.arange(0, NBN)  # [NBN]
    i = nested[:, None] * 256 + tl.arange(0, 256)[None, :]  # [NBN, 256]
    mask = i < nblocks
    centered = flush(tl.where(mask, tl.load(absmax_ptr + i, mask=mask, other=0.0) - offset, 0.0))
    nested_absmax = tl.max(tl.abs(centered), axis=1)
    y = flush(centered * reciprocal_approx(nested_absmax, rcp_delta_ptr, INTERPRETED)[:, None])
    tl.store(codes_ptr + i, _encode_8bit(y, dyn_ptr).to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + nested, nested_absmax, mask=nested * 256 < nblocks)


# Buckets a side of 0 in the nf4/int4 lookup: 1/16 wide, narrower than any gap between two thresholds (nf4's
# smallest: 0.0805), so a window holds at most one.
_BUCKETS = 16
_WINDOW = 2.0**-20
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _bucket_tables(thresholds: list[float]) -> torch.Tensor:
    """int64 [4*_BUCKETS]: below | first's fp32 bits << 32 of every bucket, the last one repeated (see _encode)."""
    nb = 2 * _BUCKETS
    entries = torch.zeros(2 * nb, dtype=torch.int64)
    for b in range(nb):
        lo = -math.inf if b == 0 else b / _BUCKETS - 1 - _WINDOW
        hi = math.inf if b == nb - 1 else (b + 1) / _BUCKETS - 1 + _WINDOW
        ts = [t for t in thresholds if lo <= t < hi]  # float64 comparisons of the exact fp32 thresholds
        assert len(ts) <= 1, (b, ts)
        first = torch.tensor(ts[0] if ts else math.inf, dtype=torch.float32).view(torch.int32).item()
        entries[b:] = first << 32 | sum(t < lo for t in thresholds)  # first: signed int32 bits
    return entries


def _tables(quant_type: str, device: torch.device) -> torch.Tensor:
    """The encoder's table on ``device``, made once per device: fp4, int32, its 7 thresholds (fp32 bits) then
    code_of_rank[8]; nf4/int4, int64, the bucket entries (format's exact fp32 thresholds, compared in fp32)."""
    key = (quant_type, device)
    if key not in _TABLES:
        if quant_type == "fp4":
            thresholds = torch.tensor(codebook.FP4_MAGNITUDE_THRESHOLDS, dtype=torch.float32).view(torch.int32)
            table = torch.cat([thresholds, torch.tensor(codebook.FP4_CODE_OF_RANK, dtype=torch.int32)])
        else:
            table = _bucket_tables(format._thresholds(quant_type, torch.device("cpu")).tolist())
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def _rcp_delta(device: torch.device) -> torch.Tensor:
    """The interpreter's reciprocal table (format's); compiled kernels use the instruction and never read it."""
    return format._rcp_delta(device) if interpreted() else torch.empty(1, dtype=torch.int32, device=device)


def quantize_4bit(tensor: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(data uint8 [(n+1)//2, 1], absmax fp32 [nblocks]) of a contiguous float tensor; NaN/Inf are not checked."""
    n = tensor.numel()
    nblocks = triton.cdiv(n, blocksize)
    full = n // blocksize  # whole blocks; a partial last block is launched on its own
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=tensor.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=tensor.device)
    nb = max(1, _ELEMENTS_PER_PROGRAM // blocksize)
    args = (tensor, _tables(quant_type, tensor.device), _rcp_delta(tensor.device), data, absmax, n)
    consts = dict(
        BLOCKSIZE=blocksize, NTHRESHOLDS=len(codebook.FP4_MAGNITUDE_THRESHOLDS), SIGN_MAGNITUDE=quant_type == "fp4",
        BUCKETS=_BUCKETS, INTERPRETED=interpreted(),
    )  # fmt: skip
    if full:
        wrap_triton(_quantize_kernel)[(triton.cdiv(full, nb),)](
            *args, 0, full, NB=nb, PARTIAL=False, num_warps=_NUM_WARPS, **consts
        )
    if full < nblocks:
        wrap_triton(_quantize_kernel)[(1,)](*args, full, nblocks, NB=1, PARTIAL=True, num_warps=4, **consts)
    return data, absmax


def double_quantize(absmax: torch.Tensor, dynamic_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset fp32 0-d) of an fp32 absmax; the
    offset is format.mean_offset's (an exact float64 sum does not depend on its order)."""
    nblocks = absmax.numel()
    nnested = triton.cdiv(nblocks, 256)
    chunk = triton.cdiv(triton.cdiv(nblocks, _SUM_PROGRAMS), _SUM_BLOCK) * _SUM_BLOCK  # programs past the end: 0
    sums = torch.empty(_SUM_PROGRAMS, dtype=torch.float64, device=absmax.device)
    wrap_triton(_absmax_sums_kernel)[(_SUM_PROGRAMS,)](absmax, sums, nblocks, chunk, BLOCK=_SUM_BLOCK, num_warps=4)
    codes = torch.empty(nblocks, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(nnested, dtype=torch.float32, device=absmax.device)
    offset = torch.empty((), dtype=torch.float32, device=absmax.device)
    wrap_triton(_double_quantize_kernel)[(triton.cdiv(nnested, _NESTED_PER_PROGRAM),)](
        absmax, sums, dynamic_map, _rcp_delta(absmax.device), codes, nested_absmax, offset, nblocks,
        G=_SUM_PROGRAMS, NBN=_NESTED_PER_PROGRAM, INTERPRETED=interpreted(), num_warps=4,
    )  # fmt: skip
    return codes, nested_absmax, offset
