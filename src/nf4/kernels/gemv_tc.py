"""Decode (M = 1-4) on tensor cores: out = x @ W^T (+ bias) for 1-4 rows of bf16/fp16 x, W read once as 4-bit
codes.

The FMA kernel (gemv.py) is bound by one lookup per weight on the L1 pipe (a warp shuffle) plus an fma. Here a
code *byte* (two weights) is looked up once, as a pair of levels in x's dtype, and the products are summed by
``mma.sync.m16n8k16`` (inline PTX): W is the A operand, whose fragment register holds two neighbouring elements
of a row, which is what a byte of codes decodes to. Per pair of weights: one ``prmt`` and one shift (the table
address), one shared-memory load (the pair), 1/8 of an mma.

- The table: 256 entries (a code byte) of level pairs, one copy per lane (entry e of lane l at byte 128 e + 4 l:
  each lane reads its own bank, so a warp's 32 lookups take one shared-memory wavefront). 32 KiB a program,
  written once per program from ``quant_map``. Triton has no call for raw shared memory, so the table is a
  ``.shared`` array declared by the kernel's inline PTX (``_table``): ptxas adds it to the static shared memory,
  apart from any of Triton's. (It was the allocation Triton makes for a ``tl.gather`` over a 32 KiB tensor until
  the fourteenth session: the gather's code cost 40 instructions, and the kernel is 1-4% faster without them.)
- A warp owns 16 rows; lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8 (the fragment's rows). A step is
  256 elements of each row, in two quarters of 16 bytes a lane (8 mmas each).
  The mma's 8 columns, which a matmul would give to 8 rows of x, are given to (x row, block) pairs instead: a
  column holds x row r only where its block is (0 elsewhere), so each block's sum lands in its own column and is
  scaled by its own absmax once, after the step's 16 mmas. With 1-2 rows of x, column 4 q + 2 c + r is block c of
  quarter q: both quarters sum into one set of accumulators, and after a step lane t holds the sums of the step's
  block t (for x rows 0 and 1), so it scales them by the absmax it decodes itself (block t of its two W rows) and
  the quad's four lanes are added up once, at the item's end. One row of x on a large weight (PAIRED_MIN_PARAMS)
  pairs the quads instead: a lane's 16 bytes of a row are a 64-byte half of the step's 128, quads g and g ^ 1
  holding the two halves of one row (rows g // 2, + 8; the second quarter rows + 4, + 12), so each code load reads
  4 whole 128-byte lines rather than 8 halves (the L1's data stage, the kernel's busiest unit, takes a wavefront a
  line). Column 4 q + 2 s + c is then block c of half s of quarter q's rows; lane t of quad g holds valid sums
  where t % 2 = g % 2 (its neighbour decodes its second absmax, one shuffle), and the two halves of a row meet by
  one shuffle at the item's end. Four rows of x need 16 columns: with 3-4, each
  quarter sums into its own accumulators, column 2 r + c holding x row r, block c of the quarter; lane t then
  holds x row t's sums of the step's 4 blocks, decodes block t's absmax and its quad shares the four by 8
  shuffles a step. (The 1-2 row layout since the twenty-seventh session: H200, same process, 4096x4096 0.0083 ms
  against 0.0086 at M = 1, 0.0084 against 0.0088 at M = 2; 0.5-1% on the 70B shapes, within +-0.5% on the 8B
  MLPs. Until the twentieth session one row took columns 4 r + c, each lane decoding 4 absmax, half of them for
  columns of zeros: 28672x8192 at M = 1 took 0.0580 ms against 0.0524 after it.)
- Persistent: 4 programs of 8 warps an SM (registers capped at 64 and a 32 KiB table: 32 warps an SM; with 3
  programs of 100 registers it took 0.087 ms on 28672x8192 against 0.066: at fewer warps it is latency-bound),
  each walking (row tile, K slice) items. (A 64 KiB table, entry stride 256 bytes so that the ``prmt`` result is
  the address, saves 68 of the step's 462 instructions but needs Triton-allocated shared memory, and Triton gives a
  kernel of more than 48 KiB ``CU_FUNC_CACHE_PREFER_SHARED``, which leaves L1 at its minimum: 0.066 ms against
  0.052. With the carveout set on the compiled kernel, 2 programs of 16 warps took 0.0521 against 0.0521, H200,
  twenty-sixth session: the decode is not issue-bound, so the table stays 32 KiB and static.)
  The codes of the next step, across items, are in flight while a step computes. A slice's row sums go to a
  partial buffer, added up in slice order (deterministic): on weights up to SUM_IN_KERNEL_MAX_PARAMS by the
  program that draws a row tile's last ticket, once its items are done (``common.sum_tiles``), on larger ones by
  a second launch. (A ticket at each item's end took 18% longer on 28672x8192: its fences waited for the next
  item's codes in flight; at the program's end they cost about what the launch does, ~2.5 us, which only small
  weights gain.)

H200, one process, CUDA graphs (docs/BENCHMARKS_GPU.md), M = 1 against gemv.py: 8192x8192 0.0194 ms against
0.0267, 14336x4096 0.0190 against 0.0223, 6144x4096 0.0102 against 0.0126, 4096x4096 0.0081 against 0.0085,
1024x8192 0.0068 against 0.0080; slower on 5120x4096 (5%) and 1024x4096 (28%). ops sends M = 1 here for weights of
at least MIN_PARAMS; under torch.compile through ``nf4::matmul_table``, an op Inductor calls as it is
(it would launch the kernel itself without the register cap, a launch option it drops).

Under the interpreter the table lookup is a load of the pair computed from ``quant_map`` and the mma is an einsum
over the warp's fragments (same operands, fp32 sums).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nf4.kernels.common import (
    ampere_or_newer,
    interpreted,
    programs,
    round_to,
    run,
    sum_slices,
    sum_tiles,
    tile_counters,
)
from nf4.kernels.common import load_absmax as _absmax
from nf4.kernels.gemv import _load16

# Rows a program (8 warps), programs an SM and the register cap that lets 4 of them fit (H200 sweep on 28672x8192:
# 2 programs of 98 registers 0.0757 ms, 3 of 100 registers 0.0874, 4 capped at 64 0.0661).
BLOCK_N = 128
PROGRAMS_PER_SM = 4
MAX_REGISTERS = 64
# Weights from which ops sends M = 1 here: 2048x4096 and 1024x8192 up (3-15% faster than gemv.py with the slices
# summed in the kernel, twenty-first session; 5120x4096 5% slower, the one shape measured so); 1024x4096 (28%
# slower here) and smaller stay on gemv.py.
MIN_PARAMS = 1 << 23
# Weights up to which split-K's slices are summed at the kernel's end (common.sum_tiles) rather than by a second
# launch: H200, twenty-first session, M = 1 and 4: 1024x4096 to 8192x4096 and 4096x8192 1-17% faster (the launch
# costs ~1 us more than the tickets); 8192x8192 1% faster, 14336x4096 5% slower, 28672x8192 10% slower.
SUM_IN_KERNEL_MAX_PARAMS = 1 << 25
# Weights from which one row of x takes the paired-quad layout (whole-line code loads): H200, twenty-seventh
# session, 28672x8192 / 8192x28672 / 14336x4096 / 4096x14336 2.1-2.5% / 1.7-1.8% / 2.8% / 2.1% faster, 4096x4096 5%
# slower (sizes between not measured).
PAIRED_MIN_PARAMS = 1 << 25
MAX_M = 4  # rows of x: 2 blocks a quarter x 4 rows fill the mma's 8 columns


@dataclass(frozen=True)
class GemvTcConfig:
    """K cut into split_k slices (0: chosen so that the (row tile, slice) items fill the grid in whole rounds);
    paired: one row of x in the paired-quad layout (module docstring; None: from PAIRED_MIN_PARAMS parameters on)."""

    split_k: int = 0
    programs_per_sm: int = PROGRAMS_PER_SM
    paired: bool | None = None


def supported(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """1-4 rows of bf16/fp16 x, rows of whole 64-element blocks (a block is one or more mma column slots), on an
    Ampere or newer GPU."""
    return (
        1 <= x.shape[0] <= MAX_M
        and x.dtype in (torch.bfloat16, torch.float16)
        and k % 64 == 0
        and blocksize % 64 == 0
        and ampere_or_newer(x.device)
    )


# The pair of levels of code byte e in x's dtype: level[e >> 4] in the low half (the even element), level[e & 15]
# in the high half. bf16 is rounded to nearest from the fp32 map (round_to: the interpreter's own cast truncates).
@triton.jit
def _pair(quant_map_ptr, e, X_KIND: tl.constexpr, INTERPRETED: tl.constexpr):
    dtype: tl.constexpr = tl.bfloat16 if X_KIND == 0 else tl.float16
    lo = round_to(tl.load(quant_map_ptr + (e >> 4)), dtype, INTERPRETED).to(tl.int16, bitcast=True).to(tl.int32)
    hi = round_to(tl.load(quant_map_ptr + (e & 15)), dtype, INTERPRETED).to(tl.int16, bitcast=True).to(tl.int32)
    return (lo & 0xFFFF) | (hi << 16)


# The table (see the module docstring): each warp writes 256 / NW entries of every lane's column, then the program
# waits for all of them. Returns the table's shared-memory address (0 under the interpreter, which computes pairs).
# Called once per kernel: the PTX declares the array where it is inlined.
@triton.jit
def _table(quant_map_ptr, i, NW: tl.constexpr, X_KIND: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        base = i * 0
    else:
        lane = i % 32
        warp = i // 32
        base = tl.inline_asm_elementwise(".shared .align 16 .b32 nf4_pairs[8192]; mov.u32 $0, nf4_pairs;", "=r,r",
                                         [i], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip
        ENTRIES: tl.constexpr = 256 // NW
        for j0 in tl.static_range(0, ENTRIES, 32):
            mine = _pair(quant_map_ptr, (warp * ENTRIES + j0 + lane) & 255, X_KIND, INTERPRETED)
            for j in tl.static_range(min(32, ENTRIES)):
                pair = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r",
                                                 [mine, i * 0 + j], dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip
                base = tl.inline_asm_elementwise(
                    "st.shared.b32 [$2], $3; mov.b32 $0, $1;", "=r,r,r,r",
                    [base, base + (warp * ENTRIES + j0 + j) * 128 + lane * 4, pair], dtype=tl.int32, is_pure=False,
                    pack=1,
                )  # fmt: skip
        base = tl.inline_asm_elementwise("bar.sync 0; mov.b32 $0, $1;", "=r,r", [base], dtype=tl.int32,
                                         is_pure=False, pack=1)  # fmt: skip
    return base


# The level pairs of a code word's 4 bytes. On the GPU from this lane's column of the table: byte v lands in bits
# 8-15 of the address by one prmt (lane8 = 8 * lane in bits 0-7), a shift right makes it 128 e + 4 lane.
@triton.jit
def _lookup4(word, lane8, base, quant_map_ptr, X_KIND: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        p0 = _pair(quant_map_ptr, word & 0xFF, X_KIND, INTERPRETED)
        p1 = _pair(quant_map_ptr, (word >> 8) & 0xFF, X_KIND, INTERPRETED)
        p2 = _pair(quant_map_ptr, (word >> 16) & 0xFF, X_KIND, INTERPRETED)
        p3 = _pair(quant_map_ptr, (word >> 24) & 0xFF, X_KIND, INTERPRETED)
    else:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(
            "{ .reg .b32 a0, a1, a2, a3;"
            " prmt.b32 a0, $4, $5, 0x7604; prmt.b32 a1, $4, $5, 0x7614;"
            " prmt.b32 a2, $4, $5, 0x7624; prmt.b32 a3, $4, $5, 0x7634;"
            " shr.u32 a0, a0, 1; shr.u32 a1, a1, 1; shr.u32 a2, a2, 1; shr.u32 a3, a3, 1;"
            " add.u32 a0, a0, $6; add.u32 a1, a1, $6; add.u32 a2, a2, $6; add.u32 a3, a3, $6;"
            " ld.shared.b32 $0, [a0]; ld.shared.b32 $1, [a1]; ld.shared.b32 $2, [a2]; ld.shared.b32 $3, [a3]; }",
            "=r,=r,=r,=r,r,r,r", [word, lane8, base], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1,
        )  # fmt: skip
    return p0, p1, p2, p3


# A word of two bf16/fp16 values -> (low, high) in fp32 (the interpreter's mma).
@triton.jit
def _halves(word, X_KIND: tl.constexpr):
    if X_KIND == 0:
        return (word << 16).to(tl.float32, bitcast=True), ((word >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        low = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return low, (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


# Lane (g, t)'s four values of a per-lane quantity at k = 2t, 2t+1, 2t+8, 2t+9 as a [NW, 8, 4, 4] tensor
# (warp, g, t, j) from the two words that hold them.
@triton.jit
def _fragment(w_low, w_high, NW: tl.constexpr, X_KIND: tl.constexpr):
    a, b = _halves(w_low, X_KIND)
    c, d = _halves(w_high, X_KIND)
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (NW, 8, 4, 4))  # j = 2 * (pair) + half


# D = A B + C for each warp's m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane (g, t) holds
# A[g, 2t..2t+1] (a0), A[g+8, 2t..] (a1), A[g, 2t+8..] (a2), A[g+8, 2t+8..] (a3); B[2t..2t+1, g] (b0),
# B[2t+8.., g] (b1); C[g, 2t], C[g, 2t+1], C[g+8, 2t], C[g+8, 2t+1] (c0..c3).
@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, NW: tl.constexpr, X_KIND: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        top = _fragment(a0, a2, NW, X_KIND)  # [w, g, t, j]: A[g, k(t, j)]
        bottom = _fragment(a1, a3, NW, X_KIND)  # A[g + 8, k(t, j)]
        bx = tl.permute(_fragment(b0, b1, NW, X_KIND), (0, 2, 3, 1))  # [w, t, j, n]: B[k(t, j), n]
        d_top = tl.sum(tl.sum(top[:, :, :, :, None] * bx[:, None, :, :, :], axis=3), axis=2)  # [w, g, n]
        d_bottom = tl.sum(tl.sum(bottom[:, :, :, :, None] * bx[:, None, :, :, :], axis=3), axis=2)
        e0, e1 = tl.split(tl.reshape(d_top, (NW, 8, 4, 2)))  # n = 2t, 2t + 1
        e2, e3 = tl.split(tl.reshape(d_bottom, (NW, 8, 4, 2)))
        shape: tl.constexpr = (NW * 32,)
        d0 = c0 + tl.reshape(e0, shape)
        d1 = c1 + tl.reshape(e1, shape)
        d2 = c2 + tl.reshape(e2, shape)
        d3 = c3 + tl.reshape(e3, shape)
    else:
        if X_KIND == 0:
            asm: tl.constexpr = (
                "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9},"
                " {$10, $11, $12, $13};"
            )
        else:
            asm: tl.constexpr = (
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9},"
                " {$10, $11, $12, $13};"
            )
        d0, d1, d2, d3 = tl.inline_asm_elementwise(
            asm, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1,
        )  # fmt: skip
    return d0, d1, d2, d3


# A quarter step: 16 bytes of row a and of row b a lane (4 code words each; a warp: 16 rows x 128 elements) and
# the lane's 32 elements of x (16 words; zero outside its column's block), 8 mmas into (c0..c3). mma j takes bytes
# 2j and 2j + 1 of the lane's 16: its k = 2t, 2t + 1 are the elements of byte 2j, k = 2t + 8, 2t + 9 those of 2j + 1.
@triton.jit
def _quarter(qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3, x_ptr, xm, lane8, base, quant_map_ptr, c0, c1, c2, c3,
             NW: tl.constexpr, X_KIND: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    x0, x1, x2, x3 = _load16(x_ptr, xm, INTERPRETED)
    x4, x5, x6, x7 = _load16(x_ptr + 4, xm, INTERPRETED)
    x8, x9, x10, x11 = _load16(x_ptr + 8, xm, INTERPRETED)
    x12, x13, x14, x15 = _load16(x_ptr + 12, xm, INTERPRETED)
    a00, a01, a02, a03 = _lookup4(qa0, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    b00, b01, b02, b03 = _lookup4(qb0, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    a10, a11, a12, a13 = _lookup4(qa1, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    b10, b11, b12, b13 = _lookup4(qb1, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    a20, a21, a22, a23 = _lookup4(qa2, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    b20, b21, b22, b23 = _lookup4(qb2, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    a30, a31, a32, a33 = _lookup4(qa3, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    b30, b31, b32, b33 = _lookup4(qb3, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    # two accumulator chains (even and odd mmas): half the dependent mma latency a quarter
    c0, c1, c2, c3 = _mma(a00, b00, a01, b01, x0, x1, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    z = c0 * 0.0
    d0, d1, d2, d3 = _mma(a02, b02, a03, b03, x2, x3, z, z, z, z, NW, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a10, b10, a11, b11, x4, x5, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    d0, d1, d2, d3 = _mma(a12, b12, a13, b13, x6, x7, d0, d1, d2, d3, NW, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a20, b20, a21, b21, x8, x9, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    d0, d1, d2, d3 = _mma(a22, b22, a23, b23, x10, x11, d0, d1, d2, d3, NW, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a30, b30, a31, b31, x12, x13, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    d0, d1, d2, d3 = _mma(a32, b32, a33, b33, x14, x15, d0, d1, d2, d3, NW, X_KIND, INTERPRETED)
    return c0 + d0, c1 + d1, c2 + d2, c3 + d3


# The 4 code words of each quarter of step s for rows a and a + 8 (pa: the lane's first word of row a; rows past
# N are masked; read once, so not kept in L1); live: a per-lane tensor (the interpreter rejects a mask made with a
# scalar condition).
@triton.jit
def _step_codes(pa, s, kw, wpr, row, N, live, PAIRED: tl.constexpr, INTERPRETED: tl.constexpr):
    pb = pa + 8 * wpr
    in0 = s * 32 + kw < wpr
    if PAIRED:  # quarter 1 is rows + 4 (and + 12), the same words
        a0, a1, a2, a3 = _load16(pa + s * 32, in0 & live & (row < N), INTERPRETED, True)
        b0, b1, b2, b3 = _load16(pb + s * 32, in0 & live & (row + 8 < N), INTERPRETED, True)
        c0, c1, c2, c3 = _load16(pa + 4 * wpr + s * 32, in0 & live & (row + 4 < N), INTERPRETED, True)
        d0, d1, d2, d3 = _load16(pb + 4 * wpr + s * 32, in0 & live & (row + 12 < N), INTERPRETED, True)
        return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3
    in1 = s * 32 + 16 + kw < wpr
    live_a = live & (row < N)
    live_b = live & (row + 8 < N)
    a0, a1, a2, a3 = _load16(pa + s * 32, in0 & live_a, INTERPRETED, True)
    b0, b1, b2, b3 = _load16(pb + s * 32, in0 & live_b, INTERPRETED, True)
    c0, c1, c2, c3 = _load16(pa + s * 32 + 16, in1 & live_a, INTERPRETED, True)
    d0, d1, d2, d3 = _load16(pb + s * 32 + 16, in1 & live_b, INTERPRETED, True)
    return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3


@triton.jit
def _gemv_tc_kernel(
    x_ptr, data_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
    bias_ptr, out_ptr, partial_ptr, counter_ptr, N, K, stride_xw, per,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr, SUM_IN_KERNEL: tl.constexpr,
    PAIRED: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    THREADS: tl.constexpr = BLOCK_N * 2  # 16 rows a warp
    NW: tl.constexpr = THREADS // 32
    i = tl.arange(0, THREADS)
    lane = i % 32
    warp = i // 32
    g = lane // 4
    t = lane % 4
    wpr = K // 8  # int32 words of codes a row
    bpr = K // BLOCKSIZE
    steps = tl.cdiv(K, 256)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    total = tl.cdiv(n_tiles * SPLIT_K - pid, G) * per  # this program's steps
    lane8 = lane * 8
    zero = tl.zeros([THREADS], tl.float32)
    # mma column g (the module docstring) holds x row r, block `slot` of a quarter (quarter 0 where in_q0, 1 where
    # in_q1); columns of rows past ROWS hold zeros
    ONE_SET: tl.constexpr = ROWS <= 2  # both quarters in one set of accumulators, column g = 4 q + 2 c + r
    if PAIRED:  # (one row of x) quads g, g ^ 1 read a row's two 64-byte halves; column g = 4 q + 2 sigma + c
        rg = g // 2
        kw = 16 * (g % 2) + 4 * t
        slot = g % 2
        in_q0 = g < 4
        in_q1 = g >= 4
        r = g * 0
    elif ONE_SET:
        slot = (g // 2) % 2
        in_q0 = g < 4
        in_q1 = g >= 4
        r = g % 2
    else:  # column g = 2 r + c in each quarter's set
        slot = g % 2
        in_q0 = g >= 0
        in_q1 = in_q0
        r = g // 2
    if not PAIRED:
        rg = g
        kw = 4 * t
    x_lane = x_ptr + tl.minimum(r, ROWS - 1) * stride_xw
    x_live = r < ROWS

    base = _table(quant_map_ptr, i, NW, X_KIND, INTERPRETED)

    acc_a = zero  # W row a (b), x row 0 (x row t without ONE_SET)
    acc_b = zero
    acc_a1 = zero  # x row 1 (ONE_SET)
    acc_b1 = zero
    item = pid
    tile = pid % n_tiles
    sl = pid // n_tiles
    step_in = 0
    row_a = tile * BLOCK_N + warp * 16 + rg
    pa = data_ptr + row_a.to(tl.int64) * wpr + kw
    live = i * 0 + total > 0
    na0, na1, na2, na3, nb0, nb1, nb2, nb3, nc0, nc1, nc2, nc3, nd0, nd1, nd2, nd3 = _step_codes(
        pa, sl * per, kw, wpr, row_a, N, live, PAIRED, INTERPRETED
    )
    for it in range(0, total):
        s = sl * per + step_in
        row_a = tile * BLOCK_N + warp * 16 + rg
        row_b = row_a + 8
        qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3 = na0, na1, na2, na3, nb0, nb1, nb2, nb3
        qc0, qc1, qc2, qc3, qd0, qd1, qd2, qd3 = nc0, nc1, nc2, nc3, nd0, nd1, nd2, nd3
        # the next step's codes (the next item's first at an item's end) are loaded before this step computes
        if step_in + 1 < per:
            item1 = item
            tile1 = tile
            sl1 = sl
            step1 = step_in + 1
            pa1 = pa
            r1 = row_a
        else:
            item1 = item + G
            tile1 = item1 % n_tiles
            sl1 = item1 // n_tiles
            step1 = 0
            r1 = tile1 * BLOCK_N + warp * 16 + rg
            pa1 = data_ptr + r1.to(tl.int64) * wpr + kw
        live = (i * 0 + it + 1 < total) & (i * 0 + sl1 * per + step1 < steps)
        na0, na1, na2, na3, nb0, nb1, nb2, nb3, nc0, nc1, nc2, nc3, nd0, nd1, nd2, nd3 = _step_codes(
            pa1, sl1 * per + step1, kw, wpr, r1, N, live, PAIRED, INTERPRETED
        )
        # quarter h of the step: lane t's 32 elements are block slot 2h + t // 2 of the step (in column g's x row)
        if PAIRED:  # column g's segment (g // 2) % 2, the same elements in both quarters
            x_step = x_lane + s * 128 + 64 * ((g // 2) % 2) + 16 * t
            x_q1 = x_step
            x_in = s * 128 + 64 * ((g // 2) % 2) + 16 * t < K // 2
            x_in1 = x_in
        else:
            x_step = x_lane + s * 128 + 16 * t
            x_q1 = x_step + 64
            x_in = s * 128 + 16 * t < K // 2
            x_in1 = s * 128 + 64 + 16 * t < K // 2
        x_mine = x_live & (slot == t // 2)
        c0, c1, c2, c3 = _quarter(
            qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3, x_step,
            x_mine & in_q0 & x_in, lane8, base, quant_map_ptr,
            zero, zero, zero, zero, NW, X_KIND, INTERPRETED,
        )  # fmt: skip
        if ONE_SET:
            d0, d1, d2, d3 = c0, c1, c2, c3
        else:
            d0, d1, d2, d3 = zero, zero, zero, zero
        d0, d1, d2, d3 = _quarter(
            qc0, qc1, qc2, qc3, qd0, qd1, qd2, qd3, x_q1,
            x_mine & in_q1 & x_in1, lane8, base,
            quant_map_ptr, d0, d1, d2, d3, NW, X_KIND, INTERPRETED,
        )  # fmt: skip
        # Lane t holds columns 2t and 2t + 1 and decodes the absmax of the step's block t of rows a and b. ONE_SET:
        # (d0, d1) are row a's block t for x rows 0 and 1, (d2, d3) row b's. Otherwise x row t's: (c0, c1), (d0,
        # d1) row a's blocks 0-3, (c2, c3), (d2, d3) row b's, the quad sharing the absmax.
        ok = t < ROWS
        e = s * 256 + 64 * t
        if PAIRED:  # lane t: rows a + 4 (t // 2), block 2 sigma + ((t ^ g) & 1); the valid lane (t & 1 == g & 1) takes
            # its neighbour's block 2 sigma + 1
            row_a = row_a + 4 * (t // 2)
            row_b = row_a + 8
            e = s * 256 + 64 * (2 * (g % 2) + ((t ^ g) & 1))
        am_a = _block_absmax(row_a, e, row_a < N, K, bpr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr,
                             nested_offset_ptr, BLOCKSIZE, DOUBLE_QUANT, INTERPRETED)  # fmt: skip
        am_b = _block_absmax(row_b, e, row_b < N, K, bpr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr,
                             nested_offset_ptr, BLOCKSIZE, DOUBLE_QUANT, INTERPRETED)  # fmt: skip
        if PAIRED:
            acc_a += d0 * am_a + d1 * _xor(am_a, 1, NW, INTERPRETED)
            acc_b += d2 * am_b + d3 * _xor(am_b, 1, NW, INTERPRETED)
        elif ONE_SET:
            acc_a += d0 * am_a
            acc_b += d2 * am_b
            if ROWS == 2:
                acc_a1 += d1 * am_a
                acc_b1 += d3 * am_b
        else:
            acc_a += c0 * _from_quad(am_a, 0, NW, INTERPRETED) + c1 * _from_quad(am_a, 1, NW, INTERPRETED)
            acc_a += d0 * _from_quad(am_a, 2, NW, INTERPRETED) + d1 * _from_quad(am_a, 3, NW, INTERPRETED)
            acc_b += c2 * _from_quad(am_b, 0, NW, INTERPRETED) + c3 * _from_quad(am_b, 1, NW, INTERPRETED)
            acc_b += d2 * _from_quad(am_b, 2, NW, INTERPRETED) + d3 * _from_quad(am_b, 3, NW, INTERPRETED)
        if step_in == per - 1:  # the item's rows out: both W rows of x row t from lane t
            if PAIRED:  # the row's other half is in quad g ^ 1, lane t ^ 1; lanes of even g and t store
                acc_a = acc_a + _xor(acc_a, 5, NW, INTERPRETED)
                acc_b = acc_b + _xor(acc_b, 5, NW, INTERPRETED)
                ok = (g % 2 == 0) & (t % 2 == 0)
            elif ONE_SET:  # the quad's four blocks added up; lane 1 takes x row 1's
                acc_a = _quad_sum(acc_a, NW, INTERPRETED)
                acc_b = _quad_sum(acc_b, NW, INTERPRETED)
                if ROWS == 2:
                    acc_a = tl.where(t == 0, acc_a, _quad_sum(acc_a1, NW, INTERPRETED))
                    acc_b = tl.where(t == 0, acc_b, _quad_sum(acc_b1, NW, INTERPRETED))
            xr = t * 0 if PAIRED else t
            if SPLIT_K == 1:
                _store_rows(acc_a, row_a, ok & (row_a < N), N, bias_ptr, out_ptr + xr * N, HAS_BIAS, INTERPRETED)
                _store_rows(acc_b, row_b, ok & (row_b < N), N, bias_ptr, out_ptr + xr * N, HAS_BIAS, INTERPRETED)
            else:
                tl.store(partial_ptr + (sl * ROWS + xr) * N + row_a, acc_a, mask=ok & (row_a < N))
                tl.store(partial_ptr + (sl * ROWS + xr) * N + row_b, acc_b, mask=ok & (row_b < N))
            acc_a = zero
            acc_b = zero
            acc_a1 = zero
            acc_b1 = zero
        item = item1
        tile = tile1
        sl = sl1
        step_in = step1
        pa = pa1
    if SUM_IN_KERNEL:  # (only ever with SPLIT_K > 1)
        XR: tl.constexpr = 4 if ROWS > 2 else ROWS
        sum_tiles(pid, G, n_tiles, N, ROWS, partial_ptr, counter_ptr, bias_ptr, out_ptr, BLOCK_N, SPLIT_K, XR, HAS_BIAS,
                  INTERPRETED)  # fmt: skip


# v of lane j of this lane's quad (lanes 4g..4g+3), in each lane of the quad.
@triton.jit
def _from_quad(v, j: tl.constexpr, NW: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        quads = tl.reshape(v, (NW * 8, 4))
        picked = tl.sum(tl.where(tl.arange(0, 4)[None, :] == j, quads, 0.0), axis=1)
        return tl.reshape(tl.broadcast_to(picked[:, None], (NW * 8, 4)), (NW * 32,))
    else:
        return tl.inline_asm_elementwise(f"shfl.sync.idx.b32 $0, $1, {j}, 0x1c1f, 0xffffffff;", "=r,r", [v],
                                         dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip


# v of lane (this lane ^ m), m = 1 or 5.
@triton.jit
def _xor(v, m: tl.constexpr, NW: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        w = tl.reshape(v, (NW * 4, 2, 2, 2))  # lane bits 3-4 (with the warp), 2, 1, 0
        w = tl.flip(w, 3)
        if m == 5:
            w = tl.flip(w, 1)
        return tl.reshape(w, (NW * 32,))
    else:
        return tl.inline_asm_elementwise(f"shfl.sync.bfly.b32 $0, $1, {m}, 0x1f, 0xffffffff;", "=r,r", [v],
                                         dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip


# The sum of v over this lane's quad, in each lane of the quad.
@triton.jit
def _quad_sum(v, NW: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        quads = tl.sum(tl.reshape(v, (NW * 8, 4)), axis=1)
        return tl.reshape(tl.broadcast_to(quads[:, None], (NW * 8, 4)), (NW * 32,))
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .f32 u; shfl.sync.bfly.b32 u, $1, 1, 0x1f, 0xffffffff; add.f32 u, u, $1;"
            " shfl.sync.bfly.b32 $0, u, 2, 0x1f, 0xffffffff; add.f32 $0, $0, u; }",
            "=r,r", [v], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip


# The absmax of the block of W row `row` that holds element e (masked past K).
@triton.jit
def _block_absmax(row, e, mask, K, bpr, absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    return _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, row * bpr + e // BLOCKSIZE,
                   mask & (e < K), DOUBLE_QUANT, INTERPRETED)  # fmt: skip


@triton.jit
def _store_rows(result, rows, mask, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr):
    if HAS_BIAS:
        result += tl.load(bias_ptr + tl.minimum(rows, N - 1)).to(tl.float32)
    tl.store(out_ptr + rows, round_to(result, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def best_split(tiles: int, steps: int, slots: int) -> int:
    """The number of K slices (at most 32, at least 2 steps each) whose (row tile, slice) items fill ``slots``
    programs in whole rounds best; more slices only when 2% better. Counted as the launch cuts K: slices of
    ceil(steps / split) steps, so a split of 14 on 16 steps is 8 slices (it was scored as 14 until the twentieth
    session, which sent 14336x4096 to 8 slices where 4 fill as well: 3-7% slower on an H200)."""
    best, split_k = 0.0, 1
    for split in range(1, 33):
        per = -(-steps // split)
        if split > 1 and per < 2:
            break
        slices = -(-steps // per)
        items = tiles * slices
        fill = items / (-(-items // slots) * slots)
        if fill > best + 0.02:
            best, split_k = fill, slices
    return split_k


@functools.cache  # a decode step asks for the same few shapes every token (12 us of Python a call otherwise)
def default_config(n: int, k: int, device: torch.device) -> GemvTcConfig:
    """best_split over 256-element steps: 28672x8192 gets 7 slices (1568 items, 3 rounds of 528 programs)."""
    return GemvTcConfig(split_k=best_split(-(-n // BLOCK_N), -(-k // 256), programs(device, PROGRAMS_PER_SM)),
                        paired=n * k >= PAIRED_MIN_PARAMS)  # fmt: skip


def gemv_tc(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    n: int,
    bias: torch.Tensor | None,
    config: GemvTcConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16, M = 1-4) @ W[n, K]^T (+ bias) -> [M, n] in x's dtype."""
    m, k = x.shape
    assert supported(x, k, blocksize), (x.shape, x.dtype, blocksize)
    default = default_config(n, k, x.device)
    config = config or default
    paired = default.paired if config.paired is None else config.paired
    if x.stride(1) != 1 or x.storage_offset() % 8 or (m > 1 and x.stride(0) % 8):  # 16-byte loads of x's rows
        x = x.clone(memory_format=torch.contiguous_format)
    codes = data.reshape(-1)
    if codes.storage_offset() % 16:
        codes = codes.clone()
    steps = -(-k // 256)
    per = -(-steps // min(config.split_k or default.split_k, steps))
    split_k = -(-steps // per)  # no empty slices
    items = -(-n // BLOCK_N) * split_k
    rounds = -(-items // programs(x.device, config.programs_per_sm))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    in_kernel = split_k > 1 and n * k <= SUM_IN_KERNEL_MAX_PARAMS
    if split_k > 1:
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, -(-n // BLOCK_N)) if in_kernel else partial
    else:  # stand-ins the kernel does not read
        partial = counters = out
    double_quant = nested_absmax is not None
    if not double_quant:  # stand-ins (a pointer argument cannot be None)
        nested_absmax, nested_quant_map, nested_offset = absmax, quant_map, absmax
    options = {} if interpreted() else {"maxnreg": MAX_REGISTERS}
    run(
        _gemv_tc_kernel, (-(-items // rounds),), x.view(torch.int32), codes.view(torch.int32), absmax, quant_map,
        nested_absmax, nested_quant_map, nested_offset, bias if bias is not None else out, out, partial, counters, n, k,
        x.stride(0) // 2 if m > 1 else 0, per,  # one row: the stride is unread, 0 so it never specializes a build
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        X_KIND=0 if x.dtype == torch.bfloat16 else 1, BLOCK_N=BLOCK_N, SPLIT_K=split_k, ROWS=m,
        SUM_IN_KERNEL=in_kernel, PAIRED=paired and m == 1, INTERPRETED=interpreted(),
        num_warps=BLOCK_N // 16, **options,
    )  # fmt: skip
    if split_k > 1 and not in_kernel:
        sum_slices(partial, bias, out)
    return out
