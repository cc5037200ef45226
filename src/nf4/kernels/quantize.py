"""Quantize: fp32/fp16/bf16 -> packed 4-bit codes + absmax, then the optional 8-bit double quantization.

Two launches: the 4-bit pass (reads 2 bytes, writes 0.5 byte per bf16 param: the floor), whose programs also add
their absmax into float64 sums, then the nested pass over absmax (1/blocksize of the elements), whose programs
each finish the mean. Every rounding step mirrors ``nf4.format``, so the bytes are equal.

What the H200 runs taught (docs/BENCHMARKS_GPU.md, "Eleventh session"; docs/BENCHMARKS.md, "Twenty-fourth" and
"Twenty-fifth session"): 272 instructions a thread for 8 elements at first (28672x8192 2.1x its floor); 20 an element
after multiplying by the reciprocal with flush-to-zero, one 64-bit table entry a lookup and vector code stores
(1.27-1.49x the pass's floor); ~14 an element with the encode, pack and store in inline PTX against a table in
shared memory and the bucket found by one fma and an and (1.11-1.31x at 2048 elements a program), where the L1 pipe
bound it (ncu: 98% busy on 28672x8192, DRAM 57%), the most of it the 8-byte lookups, two wavefronts a warp and more
where buckets e and e + 16 met in a bank pair. Now the table is two 32-bit halves, each lookup one conflict-free
wavefront, at one instruction more a value (~14.5 an element at 64 a thread): the pass 1.13-1.29x, the whole
quantize 6-13% faster (same-process A/B on six shapes).
A separate kernel summing absmax cost 0.04-0.2x the floor, mostly its launch; the pass's float64 sums cost less.
On Hopper the double-quant kernel is launched with programmatic dependent launch and each pass program triggers it
first, so its launch overlaps the pass's last programs and it waits (``griddepcontrol.wait``) only for their
completion: 4096^2 2-3% faster (medians of 3-4 rounds, two calls, twenty-sixth session), the larger weights
unchanged. (Without the trigger, PDL gained nothing: the dependent launch waited for the pass to end.)
"""

from __future__ import annotations

import math
import struct
import threading

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from nf4 import codebook, format
from nf4.kernels.common import (
    ampere_or_newer,
    flush,
    hopper_or_newer,
    interpreted,
    reciprocal_approx,
    run,
    stream_zeros,
    tracing,
)

# 64 elements a thread (2 warps: the table's 64 entries are stored one a thread). H200, the whole quantize x its
# floor at elements a program / warps (docs/BENCHMARKS.md, "Twenty-fifth session", split table): 4096x4096 1024 / 2
# 1.69, 2048 / 2 1.54-1.63, 4096 / 2 1.60, 4096 / 4 1.70; 28672x8192 1.29, 1.19-1.20, 1.15, 1.25. fp4, whose encode
# compares against each of its 7 thresholds in Triton, keeps 2048 (at 4096, 252 registers a thread against 128).
_ELEMENTS_PER_PROGRAM = 4096
_FP4_ELEMENTS_PER_PROGRAM = 2048
_NUM_WARPS = 2
# The mean of absmax: the 4-bit pass's programs add into _SUM_SLOTS float64 sums (program i into slot i mod
# _SUM_SLOTS), which every double-quant program adds up; _NESTED_PER_PROGRAM nested blocks (of 256) a program.
_SUM_SLOTS = 256
_NESTED_PER_PROGRAM = 4


# Codes of scaled values y in [-1, 1] (NaN, from an all-zero block, gives 0 as every comparison is false):
#   nf4/int4: code = #{thresholds t : y > t}                       (ties to the lower code)
#   fp4:      code = code_of_rank[#{t : |y| > t}] | (y < 0) << 3  (sign-magnitude)
# nf4/int4 look the count up: y falls in one of 2*BUCKETS equal buckets over [-1, 1) and
#   code = below[b] + (y > first[b])
# where below[b] counts the thresholds under bucket b's window and first[b] is the (at most one) threshold
# inside it (+inf if none): two tables of 32-bit words, below's then first's fp32 bits (int64 entries in memory,
# below in the low word, split in shared memory so that a warp's lookups take one wavefront each: the 32 buckets
# fill the 32 banks).
# The bucket costs one fma and one and: v = y * BUCKETS + (BUCKETS + 1.5 * 2**21) lies in [2**21, 2**22), where
# fp32 steps by 1/4, so v's low bits hold y * BUCKETS + BUCKETS rounded to quarters and bits & (63 << 2) is
# 4 * (its floor mod 64), the entry's byte offset. Rounding to quarters moves y by at most 2**-7, so a bucket's
# window is widened by 2**-7 (and a margin) on each side; y = 1 lands on entry 32, a copy of the last bucket's,
# as do the entries up to 62; y a hair under -1 on entry 63, a copy of bucket 0's; NaN on entry 0 or 63 (its bits'
# low part is 0, or all ones when an instruction made it), whose code is 0 in both tables. No float->int conversion
# (a quarter of the FMA rate), no clamp. fp4 counts its 7 magnitude thresholds.
_MAGIC: tl.constexpr = tl.constexpr(1.5 * 2**21)
# Buckets a side of 0 in the nf4/int4 lookup: 1/16 wide, widened by _WINDOW a side (the rounding to quarters, and a
# margin) to 0.0782, still narrower than any gap between two thresholds (nf4's smallest: 0.0805), so a window holds
# at most one.
_BUCKETS = 16
_WINDOW = 2.0**-7 + 2.0**-20


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
        NE: tl.constexpr = 4 * BUCKETS  # entries: the 2*BUCKETS buckets, copies of the last, bucket 0's
        v = y * BUCKETS + (BUCKETS + _MAGIC)  # y * BUCKETS is exact: one rounding, as the fma
        b = (v.to(tl.int32, bitcast=True) & (4 * NE - 4)) >> 2
        entries = tl.load(tables_ptr + tl.arange(0, NE))  # int64
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


# The nf4/int4 bucket table (_tables) into shared memory as its two halves: below[64] then first[64], 32-bit words
# (the kernel's one ``.shared`` array, declared where this is inlined, once: one entry a thread, THREADS >= 64),
# then a barrier before any lookup.
@triton.jit
def _code_table(tables_ptr, THREADS: tl.constexpr):
    tl.static_assert(THREADS >= 64)
    i = tl.arange(0, THREADS)
    tl.inline_asm_elementwise(
        ".shared .align 16 .b32 nf4_codes[128];"
        " { .reg .pred p; .reg .u32 a, lo, hi; setp.lt.u32 p, $1, 64; mov.u32 a, nf4_codes; mad.lo.u32 a, $1, 4, a;"
        " mov.b64 {lo, hi}, $2; @p st.shared.b32 [a], lo; @p st.shared.b32 [a+256], hi; bar.sync 0; mov.b32 $0, 0; }",
        "=r,r,l", [i, tl.load(tables_ptr + (i & 63))], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


# Four consecutive columns of t [NB, 4 * W], as four tensors [NB, W] (columns 4w + 0 ... 4w + 3).
@triton.jit
def _split4(t, NB: tl.constexpr, W: tl.constexpr):
    even, odd = tl.split(tl.reshape(t, (NB, W, 2, 2)))
    t0, t2 = tl.split(even)
    t1, t3 = tl.split(odd)
    return t0, t1, t2, t3


def _encode8_ptx() -> str:
    """Inline PTX of _encode (nf4/int4) on eight scaled values $1-$8 (elements 8w ... 8w + 7), packed into their
    four code bytes, stored as word $10 from address $9 where $11 is not 0 ($0: a dummy): per value one fma, an and, an
    add, two 32-bit loads from nf4_codes (below, first), a subtraction, a shift and an add; a multiply-add a value
    packs. Storing here keeps the word in the thread that made it (Triton's store regathers 4 a thread through shared
    memory)."""
    scale, offset = (struct.unpack("<I", struct.pack("<f", v))[0] for v in (_BUCKETS, _BUCKETS + _MAGIC.value))
    mask = (4 * _BUCKETS - 1) << 2  # _encode's entries, 4 bytes a table
    body = "{ .reg .b32 t, a<8>, c<8>, f<8>; .reg .pred p; mov.u32 t, nf4_codes;"
    for i in range(8):  # y > first as the sign bit of first - y (no predicate a value: ptxas spilled them)
        body += (f" fma.rn.f32 a{i}, ${i + 1}, 0f{scale:08X}, 0f{offset:08X}; and.b32 a{i}, a{i}, {mask};"
                 f" add.u32 a{i}, a{i}, t; ld.shared.u32 c{i}, [a{i}]; ld.shared.u32 f{i}, [a{i}+256];"
                 f" sub.rn.f32 f{i}, f{i}, ${i + 1}; shr.u32 f{i}, f{i}, 31; add.u32 c{i}, c{i}, f{i};")  # fmt: skip
    for hi, lo, shift in ((0, 1, 0), (2, 3, 8), (4, 5, 16), (6, 7, 24)):  # byte j: element 2j high, 2j + 1 low
        body += f" mad.lo.u32 c{lo}, c{hi}, 16, c{lo};"
        if shift:
            body += f" mad.lo.u32 c1, c{lo}, {1 << shift}, c1;"
    return body + (
        " setp.ne.s32 p, $11, 0; { .reg .b64 w; mad.wide.u32 w, $10, 4, $9; @p st.global.b32 [w], c1; }"
        " mov.b32 $0, 0; }"
    )


_ENCODE8: tl.constexpr = tl.constexpr(_encode8_ptx())


# A word of two bf16 (element 2j in the low half) as two fp32, and the larger magnitude of the two (NaN if either
# is). In inline PTX on the GPU (max.NaN: sm_80): through Triton's bit ops LLVM turns |x| into an and on the bits,
# an instruction a value more than the max's |x| operands.
@triton.jit
def _unpack_bf16(w, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        even, odd = (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)
        return even, odd, _max_keeping_nan(tl.abs(even), tl.abs(odd))
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 a, b; shl.b32 $0, $3, 16; and.b32 $1, $3, 0xFFFF0000; abs.f32 a, $0; abs.f32 b, $1;"
            " max.NaN.f32 $2, a, b; }",
            "=f,=f,=f,r", [w], dtype=(tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
        )  # fmt: skip


# A program quantizes NB whole blocks, each as its element pairs (2j, 2j + 1) -> byte j (high, low nibble):
#   absmax_b = flush(max |x| over block b) (NaN if any x is; flushing x first would not change it)
#   y = mul_ftz(x, rcp(absmax_b))
# bf16 on a 4-byte boundary is loaded as pair words and unpacked by a shift and an and (Triton's conversion took a
# byte permute more for the odd element); other inputs load as [NB, BS] and split in registers. Four bytes leave
# as one word; compiled, nf4/int4 encode, pack and store in inline PTX (_encode8_ptx) against the table in shared
# memory: Triton 3.6 SASS, 928 instructions a thread of 64 elements (504 of 32) against 640 of 32 through Triton's
# gather, byte packing and store (which regathered the words through shared memory). With SUMS the
# program adds its blocks' absmax, in float64, into sums[pid % G] (no ordering: the sum is exact, see
# format.mean_offset), which the double-quant kernel reads and zeroes: no pass over absmax of its own. Masks are
# per block, so loads and stores stay 16 / 4 bytes wide; a partial last block is a second launch (PARTIAL)
# masked per element, with byte stores.
@triton.jit
def _quantize_kernel(
    x_ptr,
    tables_ptr,
    rcp_delta_ptr,
    data_ptr,
    absmax_ptr,
    sums_ptr,
    n,
    first_block,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    NTHRESHOLDS: tl.constexpr,
    SIGN_MAGNITUDE: tl.constexpr,
    BUCKETS: tl.constexpr,
    PARTIAL: tl.constexpr,
    BF16_WORDS: tl.constexpr,
    SUMS: tl.constexpr,
    G: tl.constexpr,
    THREADS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:  # the double-quant kernel (launched with PDL) may start; it waits for this one to finish
        gdc_launch_dependents()
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB) + first_block  # [NB]
    pair = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB] = byte index
    if BF16_WORDS:
        w = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + pair, mask=(blk < nblocks)[:, None], other=0)
        even, odd, pair_max = _unpack_bf16(w, INTERPRETED)
    else:
        elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [NB, BS]
        elem_mask = elem < n if PARTIAL else (blk < nblocks)[:, None]
        x = tl.load(x_ptr + elem, mask=elem_mask, other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (NB, HB, 2)))
        pair_max = _max_keeping_nan(tl.abs(even), tl.abs(odd))
    asm: tl.constexpr = not (INTERPRETED or SIGN_MAGNITUDE or PARTIAL)
    if asm:  # after x's load is issued: the table's load and barrier overlap it
        _code_table(tables_ptr, THREADS)
    absmax = flush(tl.reduce(pair_max, 1, _max_keeping_nan))  # [NB]
    r = reciprocal_approx(absmax, rcp_delta_ptr, INTERPRETED)[:, None]
    y_even, y_odd = _mul_ftz(even, r, INTERPRETED), _mul_ftz(odd, r, INTERPRETED)
    if PARTIAL:
        code = _encode(y_even, tables_ptr, NTHRESHOLDS, SIGN_MAGNITUDE, BUCKETS) << 4
        code |= _encode(y_odd, tables_ptr, NTHRESHOLDS, SIGN_MAGNITUDE, BUCKETS)
        tl.store(data_ptr + pair, code.to(tl.uint8), mask=pair < (n + 1) // 2)
    else:
        W: tl.constexpr = BLOCKSIZE // 8
        first = data_ptr.to(tl.pointer_type(tl.int32)) + (tl.program_id(0).to(tl.int64) * NB + first_block) * W
        local = tl.arange(0, NB)[:, None] * W + tl.arange(0, W)[None, :]  # [NB, W]: word index from first
        in_range = (blk < nblocks)[:, None] & (tl.arange(0, W) < W)[None, :]  # [NB, W], as the words
        if asm:
            e0, e2, e4, e6 = _split4(y_even, NB, W)
            e1, e3, e5, e7 = _split4(y_odd, NB, W)
            tl.inline_asm_elementwise(_ENCODE8, "=r,r,r,r,r,r,r,r,r,l,r,r",
                                      [e0, e1, e2, e3, e4, e5, e6, e7, first.to(tl.int64, bitcast=True), local,
                                       in_range.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
        else:
            words = first + local
            code = _encode(y_even, tables_ptr, NTHRESHOLDS, SIGN_MAGNITUDE, BUCKETS) << 4
            b0, b1, b2, b3 = _split4(code | _encode(y_odd, tables_ptr, NTHRESHOLDS, SIGN_MAGNITUDE, BUCKETS), NB, W)
            tl.store(words, b0 | b1 << 8 | b2 << 16 | b3 << 24, mask=in_range)
    tl.store(absmax_ptr + blk, absmax, mask=blk < nblocks)
    if SUMS:
        tl.atomic_add(sums_ptr + tl.program_id(0) % G, tl.sum(absmax.to(tl.float64)), sem="relaxed")


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


# A program takes NBN nested blocks of 256 absmax values (each program adds the G sums: more blocks a program
# amortize that):
#   offset = fp32(sum(sums) / nblocks) (stored by program 0)
#   c = flush(absmax - offset) (0 past the end);  nested_absmax = max |c| over the block
#   code = encode_8bit(flush(c * rcp(nested_absmax)))
# Each program takes a ticket once it has read the sums; the last one zeroes them and the counter for the next call.
@triton.jit
def _double_quantize_kernel(
    absmax_ptr, sums_ptr, counter_ptr, table_ptr, rcp_delta_ptr, codes_ptr, nested_absmax_ptr, offset_ptr, nblocks,
    G: tl.constexpr, NBN: tl.constexpr, KEY_MIN: tl.constexpr, SIDE: tl.constexpr, INTERPRETED: tl.constexpr,
    WAIT: tl.constexpr,
):  # fmt: skip
    if WAIT:  # launched with PDL: the 4-bit pass's absmax and sums are complete and visible past this
        gdc_wait()
    nested = tl.program_id(0).to(tl.int64) * NBN + tl.arange(0, NBN)  # [NBN]
    i = nested[:, None] * 256 + tl.arange(0, 256)[None, :]  # [NBN, 256]
    mask = i < nblocks
    absmax = tl.load(absmax_ptr + i, mask=mask, other=0.0)  # issued before the sums' load
    offset = (tl.sum(tl.load(sums_ptr + tl.arange(0, G))) / nblocks).to(tl.float32)
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if tl.program_id(0) == 0:
        tl.store(offset_ptr, offset)
    centered = flush(tl.where(mask, absmax - offset, 0.0))
    nested_absmax = tl.max(tl.abs(centered), axis=1)
    y = flush(centered * reciprocal_approx(nested_absmax, rcp_delta_ptr, INTERPRETED)[:, None])
    tl.store(codes_ptr + i, _encode_8bit(y, table_ptr, KEY_MIN, SIDE).to(tl.uint8), mask=mask)
    tl.store(nested_absmax_ptr + nested, nested_absmax, mask=nested * 256 < nblocks)
    if ticket == tl.num_programs(0) - 1:
        tl.store(sums_ptr + tl.arange(0, G), tl.zeros((G,), tl.float64))
        tl.store(counter_ptr, 0)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _pack_entries(below: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """int64 table entries (read by _entry_code): below (int, >= 0) | first's fp32 bits << 32."""
    return first.to(torch.float32).view(torch.int32).to(torch.int64) << 32 | below.to(torch.int64)


def _bucket_tables(thresholds: list[float]) -> torch.Tensor:
    """int64 [4*_BUCKETS]: the entry of every bucket, copies of the last one, then bucket 0's (see _encode)."""
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
    return torch.cat([entries, entries[-1:].expand(nb - 1), entries[:1]])


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


def _pdl(device: torch.device) -> bool:
    """Whether the double quant is launched with programmatic dependent launch (module docstring): on Hopper, and
    not while torch.compile traces the op (Inductor launches the kernels itself, without the launch option)."""
    return hopper_or_newer(device) and not tracing()


# Held while a quantize enqueues its two launches: another thread's pass must not add into the sums between them.
_ENQUEUE = threading.Lock()


def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The double quant's float64 sums (slots of the 4-bit pass's programs) and its kernel's ticket counter, this
    stream's (common.stream_zeros): the pass adds into the sums, the double-quant kernel's last program zeroes both,
    so each call finds them zeroed without a memset."""
    return (stream_zeros("double-quant sums", device, _SUM_SLOTS, torch.float64),
            stream_zeros("double-quant ticket", device, 1, torch.int32))  # fmt: skip


def quantize_4bit(
    tensor: torch.Tensor, quant_type: str, blocksize: int, sums: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(data uint8 [(n+1)//2, 1], absmax fp32 [nblocks]) of a contiguous float tensor; NaN/Inf are not checked.
    With ``sums`` (float64 [_SUM_SLOTS]), also adds the absmax values into it, for _double_quantize."""
    n = tensor.numel()
    nblocks = triton.cdiv(n, blocksize)
    full = n // blocksize  # whole blocks; a partial last block is launched on its own
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=tensor.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=tensor.device)
    nb = max(1, (_FP4_ELEMENTS_PER_PROGRAM if quant_type == "fp4" else _ELEMENTS_PER_PROGRAM) // blocksize)
    # (without sums, absmax stands in: the kernel's SUMS=False never reads it)
    args = (tensor, _tables(quant_type, tensor.device), _rcp_delta(tensor.device), data, absmax,
            absmax if sums is None else sums, n)  # fmt: skip
    consts = dict(
        BLOCKSIZE=blocksize, NTHRESHOLDS=len(codebook.FP4_MAGNITUDE_THRESHOLDS), SIGN_MAGNITUDE=quant_type == "fp4",
        BUCKETS=_BUCKETS, SUMS=sums is not None, G=_SUM_SLOTS, INTERPRETED=interpreted(),
        TRIGGER=sums is not None and _pdl(tensor.device),
    )  # fmt: skip
    if full:
        words = tensor.dtype == torch.bfloat16 and tensor.data_ptr() % 4 == 0 and ampere_or_newer(tensor.device)
        run(_quantize_kernel, (triton.cdiv(full, nb),), *args, 0, full, NB=nb, PARTIAL=False, BF16_WORDS=words,
            THREADS=32 * _NUM_WARPS, num_warps=_NUM_WARPS, **consts)  # fmt: skip
    if full < nblocks:
        run(_quantize_kernel, (1,), *args, full, nblocks, NB=1, PARTIAL=True, BF16_WORDS=False, THREADS=128,
            num_warps=4, **consts)  # fmt: skip
    return data, absmax


def _double_quantize(
    absmax: torch.Tensor, sums: torch.Tensor, counter: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nblocks = absmax.numel()
    nnested = triton.cdiv(nblocks, 256)
    codes = torch.empty(nblocks, dtype=torch.uint8, device=absmax.device)
    nested_absmax = torch.empty(nnested, dtype=torch.float32, device=absmax.device)
    offset = torch.empty((), dtype=torch.float32, device=absmax.device)
    pdl = _pdl(absmax.device)
    try:
        run(_double_quantize_kernel, (triton.cdiv(nnested, _NESTED_PER_PROGRAM),), absmax, sums, counter,
            _dq_table(absmax.device), _rcp_delta(absmax.device), codes, nested_absmax, offset, nblocks,
            G=_SUM_SLOTS, NBN=_NESTED_PER_PROGRAM, KEY_MIN=_DQ_KEY_MIN, SIDE=_DQ_SIDE, INTERPRETED=interpreted(),
            WAIT=pdl, num_warps=4, **({"launch_pdl": True} if pdl else {}))  # fmt: skip
    except BaseException:
        sums.zero_()  # the kernel that zeroes them did not run
        counter.zero_()
        raise
    return codes, nested_absmax, offset


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [nblocks], nested_absmax fp32 [ceil(nblocks/256)], offset fp32 0-d) of any fp32 absmax, in
    bitsandbytes' dynamic map (format's); the offset is format.mean_offset's (an exact float64 sum does not depend
    on its order). Its sum is torch's, as no 4-bit pass added it up."""
    sums = torch.zeros(_SUM_SLOTS, dtype=torch.float64, device=absmax.device)
    sums[0] = absmax.sum(dtype=torch.float64)
    return _double_quantize(absmax, sums, torch.zeros(1, dtype=torch.int32, device=absmax.device))


def quantize(
    tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, absmax or its 8-bit codes, nested_absmax, offset) of a contiguous float tensor (the last two empty
    without double quant): two launches with double quant, the pass adding the sums of absmax as it goes."""
    if not double_quant:
        data, absmax = quantize_4bit(tensor, quant_type, blocksize)
        return data, absmax, absmax.new_empty(0), absmax.new_empty(0)
    with _ENQUEUE:
        sums, counter = _scratch(tensor.device)
        data, absmax = quantize_4bit(tensor, quant_type, blocksize, sums)
        return data, *_double_quantize(absmax, sums, counter)
