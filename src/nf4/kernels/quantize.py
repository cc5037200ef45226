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
the kernel with 4 nested blocks a program (each adding the 256 sums), 0.026; with the 8-bit encoder by lookup
instead of its binary search, 0.015 (the whole: 0.207 -> 0.196 ms, 1.42x the floor).
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
# The code of y from its bucket's 64-bit table entry (both encoders' tables, made by _pack_entries): below in the
# low word, first's fp32 bits in the high word; code = below + (y > first).
@triton.jit
def _entry_code(y, entry):
    first = (entry >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return entry.to(tl.int32) + (y > first).to(tl.int32)


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
        code = _entry_code(y, tl.reshape(tl.gather(entries, tl.reshape(b, (y.numel,)), 0), y.shape))
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


# bitsandbytes' 8-bit encoder (format._encode_8bit: a binary search over the 256-entry map, then a midpoint test)
# by lookup. Its code is a non-decreasing step function of y, so with |y|'s range cut into buckets that each hold at
# most one of its steps,
#   code = below[b] + (y > first[b])
# exactly, where b is y's bucket: 1/64 of an octave of |y| (the top 14 bits of |y|'s fp32 bits: exponent and 6
# mantissa bits; every |y| < 2**-22 in bucket 0), one table half a sign, and below / first (the fp32 value past
# which the code steps up; +inf if none) one 64-bit entry, found from the reference encoder itself (_dq_table).
# Entries past |y| = 2 (reached only by NaN, from a nested block of equal values) give the reference's code 0.
# One load an element instead of the search's 10 dependent ones.
@triton.jit
def _encode_8bit(y, table_ptr, KEY_MIN: tl.constexpr, SIDE: tl.constexpr):
    bits = y.to(tl.int32, bitcast=True)
    key = ((bits & 0x7FFFFFFF) >> 17) - (KEY_MIN - 1)
    b = tl.minimum(tl.maximum(key, 0), SIDE - 1) + tl.where(bits < 0, SIDE, 0)
    return _entry_code(y, tl.load(table_ptr + b))


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


# A program takes NBN nested blocks of 256 absmax values (each program adds the G sums: more blocks a program
# amortize that):
#   offset = fp32(sum(sums) / nblocks) (stored by program 0)
#   c = flush(absmax - offset) (0 past the end);  nested_absmax = max |c| over the block
#   code = encode_8bit(flush(c * rcp(nested_absmax)))
@triton.jit
def _double_quantize_kernel(
    absmax_ptr, sums_ptr, table_ptr, rcp_delta_ptr, codes_ptr, nested_absmax_ptr, offset_ptr, nblocks,
    G: tl.constexpr, NBN: tl.constexpr, KEY_MIN: tl.constexpr, SIDE: tl.constexpr, INTERPRETED: tl.constexpr,
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
    tl.store(codes_ptr + i, _encode_8bit(y, table_ptr, KEY_MIN, SIDE).to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + nested, nested_absmax, mask=nested * 256 < nblocks)


# Buckets a side of 0 in the nf4/int4 lookup: 1/16 wide, narrower than any gap between two thresholds (nf4's
# smallest: 0.0805), so a window holds at most one.
_BUCKETS = 16
_WINDOW = 2.0**-20
_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pack_entries(below: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """int64 table entries (read by _entry_code): below (int, >= 0) | first's fp32 bits << 32."""
    return first.to(torch.float32).view(torch.int32).to(torch.int64) << 32 | below.to(torch.int64)


def _bucket_tables(thresholds: list[float]) -> torch.Tensor:
    """int64 [4*_BUCKETS]: the entry of every bucket, then copies of the last one (see _encode)."""
    nb = 2 * _BUCKETS
    below, first = [], []
    for b in range(nb):
        lo = -math.inf if b == 0 else b / _BUCKETS - 1 - _WINDOW
        hi = math.inf if b == nb - 1 else (b + 1) / _BUCKETS - 1 + _WINDOW
        ts = [t for t in thresholds if lo <= t < hi]  # float64 comparisons of the exact fp32 thresholds
        assert len(ts) <= 1, (b, ts)
        below.append(sum(t < lo for t in thresholds))
        first.append(ts[0] if ts else math.inf)
    entries = _pack_entries(torch.tensor(below), torch.tensor(first, dtype=torch.float64))
    return torch.cat([entries, entries[-1:].expand(nb)])


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


# The 8-bit encoder's buckets (see _encode_8bit): keys are |y|'s fp32 bits >> 17; bucket 0 holds |y| < 2**-22
# (the map's smallest magnitude is 5.5e-7, so its first step is at 2.75e-7); _DQ_SIDE entries a sign.
_DQ_KEY_MIN = (127 - 22) << 6
_DQ_SIDE = 2048
_DQ_TABLES: dict[torch.device, torch.Tensor] = {}


def _dq_table(device: torch.device) -> torch.Tensor:
    """int64 [2 * _DQ_SIDE], made once per device from the reference encoder: for each bucket of |y| (positive y,
    then negative), below | first's fp32 bits << 32. Each bucket's step is found by bisecting its range of fp32
    values (as bits) with format._encode_8bit, which is monotone in y; the build asserts one step at most."""
    if device not in _DQ_TABLES:
        dyn = format._dynamic_map(torch.device("cpu"))
        i = torch.arange(_DQ_SIDE, dtype=torch.int64)
        start = torch.where(i == 0, 0, (_DQ_KEY_MIN + i - 1) << 17)
        end = (_DQ_KEY_MIN + i) << 17  # exclusive
        start, end = start[end <= 128 << 23], end[end <= 128 << 23]  # |y| < 2
        entries = _pack_entries(torch.zeros(2 * _DQ_SIDE), torch.full((2 * _DQ_SIDE,), math.inf))  # past 2: code 0
        for half, sign in enumerate((1.0, -1.0)):

            def code(m: torch.Tensor, sign: float = sign) -> torch.Tensor:
                return format._encode_8bit(m.to(torch.int32).view(torch.float32) * sign, dyn).to(torch.int64)

            lo, hi = start, end - 1  # each bucket's first and last fp32 magnitude, as bits
            c_lo, c_hi = code(lo), code(hi)
            steps = (c_hi - c_lo).abs()
            assert bool((steps <= 1).all()), "an 8-bit encoder bucket holds two steps"
            for _ in range(18):  # buckets with a step span 2**17 values: lo keeps c_lo's code, hi the other
                mid = (lo + hi) // 2
                keep = (hi - lo > 1) & (code(mid) == c_lo)
                lo, hi = torch.where(keep, mid, lo), torch.where((hi - lo > 1) & ~keep, mid, hi)
            assert bool(((hi - lo == 1) | (steps == 0)).all()), "a step left unbisected (bucket 0 holds one)"
            # y > first: positive, past magnitude lo (c_lo's last); negative, above -hi (c_hi's first)
            first = lo.to(torch.int32).view(torch.float32) if sign > 0 else -hi.to(torch.int32).view(torch.float32)
            first = torch.where(steps == 0, math.inf, first)
            below = torch.minimum(c_lo, c_hi)
            entries[half * _DQ_SIDE : half * _DQ_SIDE + below.numel()] = _pack_entries(below, first)
        _DQ_TABLES[device] = entries.to(device)
    return _DQ_TABLES[device]


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


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset fp32 0-d) of an fp32 absmax, in
    bitsandbytes' dynamic map (format's); the offset is format.mean_offset's (an exact float64 sum does not depend
    on its order)."""
    nblocks = absmax.numel()
    nnested = triton.cdiv(nblocks, 256)
    chunk = triton.cdiv(triton.cdiv(nblocks, _SUM_PROGRAMS), _SUM_BLOCK) * _SUM_BLOCK  # programs past the end: 0
    sums = torch.empty(_SUM_PROGRAMS, dtype=torch.float64, device=absmax.device)
    wrap_triton(_absmax_sums_kernel)[(_SUM_PROGRAMS,)](absmax, sums, nblocks, chunk, BLOCK=_SUM_BLOCK, num_warps=4)
    codes = torch.empty(nblocks, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(nnested, dtype=torch.float32, device=absmax.device)
    offset = torch.empty((), dtype=torch.float32, device=absmax.device)
    wrap_triton(_double_quantize_kernel)[(triton.cdiv(nnested, _NESTED_PER_PROGRAM),)](
        absmax, sums, _dq_table(absmax.device), _rcp_delta(absmax.device), codes, nested_absmax, offset, nblocks,
        G=_SUM_PROGRAMS, NBN=_NESTED_PER_PROGRAM, KEY_MIN=_DQ_KEY_MIN, SIDE=_DQ_SIDE, INTERPRETED=interpreted(),
        num_warps=4,
    )  # fmt: skip
    return codes, nested_absmax, offset
