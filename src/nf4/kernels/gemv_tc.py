"""Decode (M = 1-2) on tensor cores: out = x @ W^T (+ bias) for one or two rows of bf16/fp16 x, W read once as 4-bit
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
  256 elements of each row, in two quarters of 16 bytes a lane (8 mmas each). The mma's 8 columns, which a
  matmul would give to 8 rows of x, are given to blocks instead: the x column of slot c holds x only where the
  step's block c is (0 elsewhere), so each block's sum lands in its own column and is scaled by its own absmax
  once, after the step's 16 mmas. A step has 4 blocks, so columns 4-7 take a second row of x (column 4 r + c:
  row r, block c) at no extra work: M = 2 costs what M = 1 does (H200, nineteenth session: 28672x8192 0.0597 ms
  against 0.0579 for one row and 0.0727 for gemv_tcm; each row's bits equal its M = 1 result).
- Persistent: 4 programs of 8 warps an SM (registers capped at 64 and a 32 KiB table: 32 warps an SM; with 2
  programs of 98 registers and a 64 KiB table it took 0.076 ms on 28672x8192 against 0.066, with 3 programs of
  100 registers 0.087: at 16 warps an SM it is latency-bound, 36% of its stalls waiting on the table loads),
  each walking (row tile, K slice) items;
  the codes of the next step, across items, are in flight while a step computes. A slice's row sums go to a
  partial buffer, which a second launch adds up in slice order (deterministic). Summing in the kernel instead (a
  ticket per warp, the last to draw adds the slices) took 18% longer on 28672x8192: the ticket's fences wait for
  the next item's codes in flight and stalled a warp at each item's end.

H200, one process, CUDA graphs (docs/BENCHMARKS_GPU.md, thirteenth session): 28672x8192 0.0588 ms against 0.0730
for gemv.py, 8192x28672 0.0548 against 0.0713, 8192x8192 0.0216 against 0.0267, 14336x4096 0.0213 against 0.0229,
4096x14336 0.0210 against 0.0211; slower on 4096x4096 (4-7%) and 1024x4096 (35%). ops sends M = 1 here for
weights of at least MIN_PARAMS; under torch.compile through ``nf4::matmul_table``, an op Inductor calls as it is
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

from nf4.kernels.common import interpreted, programs, round_to, run, sum_slices
from nf4.kernels.common import load_absmax as _absmax
from nf4.kernels.gemv import _load16

# Rows a program (8 warps), programs an SM and the register cap that lets 4 of them fit (H200 sweep on 28672x8192:
# 2 programs of 98 registers 0.0757 ms, 3 of 100 registers 0.0874, 4 capped at 64 0.0661).
BLOCK_N = 128
PROGRAMS_PER_SM = 4
MAX_REGISTERS = 64
# Weights from which ops sends M = 1 here: the 70B projections, the 8B MLPs (7-23% faster than gemv.py, 2% on
# 4096x14336) and the 8B's fused q/k/v, 6144x4096 (0.0105 ms against 0.0136, fifteenth session); 4096x4096 (3%
# slower here) and smaller stay on gemv.py.
MIN_PARAMS = 5 << 22
MAX_M = 2  # rows of x: 4 blocks a step x 2 rows fill the mma's 8 columns


@dataclass(frozen=True)
class GemvTcConfig:
    """K cut into split_k slices (0: chosen so that the (row tile, slice) items fill the grid in whole rounds)."""

    split_k: int = 0
    programs_per_sm: int = PROGRAMS_PER_SM


def supported(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """One or two rows of bf16/fp16 x, rows of whole 64-element blocks (a block is one or more mma column slots)."""
    return (
        1 <= x.shape[0] <= MAX_M and x.dtype in (torch.bfloat16, torch.float16) and k % 64 == 0 and blocksize % 64 == 0
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


# v + v of lane ^ 1 (SPAN = 2), then + that of lane ^ 2 (SPAN = 4): the sum over SPAN neighbouring lanes, in each.
@triton.jit
def _sum_over_t(v, NW: tl.constexpr, SPAN: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        groups = tl.sum(tl.reshape(v, (NW * 32 // SPAN, SPAN)), axis=1)
        return tl.reshape(tl.broadcast_to(groups[:, None], (NW * 32 // SPAN, SPAN)), (NW * 32,))
    else:
        v += tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 1, 0x1f, 0xffffffff;", "=r,r", [v],
                                       dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        if SPAN == 4:
            v += tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, 2, 0x1f, 0xffffffff;", "=r,r", [v],
                                           dtype=tl.float32, is_pure=True, pack=1)  # fmt: skip
        return v


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
def _step_codes(pa, s, t, wpr, live_a, live_b, INTERPRETED: tl.constexpr):
    pb = pa + 8 * wpr
    in0 = s * 32 + 4 * t < wpr
    in1 = s * 32 + 16 + 4 * t < wpr
    a0, a1, a2, a3 = _load16(pa + s * 32, in0 & live_a, INTERPRETED, True)
    b0, b1, b2, b3 = _load16(pb + s * 32, in0 & live_b, INTERPRETED, True)
    c0, c1, c2, c3 = _load16(pa + s * 32 + 16, in1 & live_a, INTERPRETED, True)
    d0, d1, d2, d3 = _load16(pb + s * 32 + 16, in1 & live_b, INTERPRETED, True)
    return a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3, d0, d1, d2, d3


@triton.jit
def _gemv_tc_kernel(
    x_ptr, data_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
    bias_ptr, out_ptr, partial_ptr, N, K, stride_xw, per,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr, INTERPRETED: tl.constexpr,
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
    # mma column g = 4 r + c: x row r (r < ROWS), the step's block c; lane (g, t) loads x row r's elements. The
    # ROWS == 1 forms here and below give the same results as the general ones on the lanes that count; they keep
    # the one-row build's SASS as it was measured (the general forms change its loop: 511 -> 512 instructions in
    # the bf16 split-K build, 445 -> 435 in the fp16 one, Triton 3.6; not timed)
    if ROWS == 1:
        slot = g
        x_lane = x_ptr
    else:
        slot = g % 4
        x_lane = x_ptr + (g // 4) * stride_xw

    base = _table(quant_map_ptr, i, NW, X_KIND, INTERPRETED)

    acc_a = zero
    acc_b = zero
    item = pid
    tile = pid % n_tiles
    sl = pid // n_tiles
    step_in = 0
    row_a = tile * BLOCK_N + warp * 16 + g
    pa = data_ptr + row_a.to(tl.int64) * wpr + 4 * t
    live = i * 0 + total > 0
    na0, na1, na2, na3, nb0, nb1, nb2, nb3, nc0, nc1, nc2, nc3, nd0, nd1, nd2, nd3 = _step_codes(
        pa, sl * per, t, wpr, live & (row_a < N), live & (row_a + 8 < N), INTERPRETED
    )
    for it in range(0, total):
        s = sl * per + step_in
        row_a = tile * BLOCK_N + warp * 16 + g
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
            r1 = tile1 * BLOCK_N + warp * 16 + g
            pa1 = data_ptr + r1.to(tl.int64) * wpr + 4 * t
        live = (i * 0 + it + 1 < total) & (i * 0 + sl1 * per + step1 < steps)
        na0, na1, na2, na3, nb0, nb1, nb2, nb3, nc0, nc1, nc2, nc3, nd0, nd1, nd2, nd3 = _step_codes(
            pa1, sl1 * per + step1, t, wpr, live & (r1 < N), live & (r1 + 8 < N), INTERPRETED
        )
        # quarter h of the step: lane t's 32 elements are block slot 2h + t // 2 of the step (in column g's x row)
        x_step = x_lane + s * 128 + 16 * t
        c0, c1, c2, c3 = _quarter(
            qa0, qa1, qa2, qa3, qb0, qb1, qb2, qb3, x_step, (slot == t // 2) & (s * 128 + 16 * t < K // 2),
            lane8, base, quant_map_ptr, zero, zero, zero, zero, NW, X_KIND, INTERPRETED,
        )  # fmt: skip
        c0, c1, c2, c3 = _quarter(
            qc0, qc1, qc2, qc3, qd0, qd1, qd2, qd3, x_step + 64,
            (slot == 2 + t // 2) & (s * 128 + 64 + 16 * t < K // 2), lane8, base, quant_map_ptr, c0, c1, c2,
            c3, NW, X_KIND, INTERPRETED,
        )  # fmt: skip
        # lane t now holds columns 2t, 2t + 1: x row t // 2's sums of the step's blocks 2 (t % 2) and 2 (t % 2) + 1
        # (elements 128 (t % 2) + [0, 64), + [64, 128)) of rows a (c0, c1) and b (c2, c3); at ROWS = 1, lanes 2, 3
        # hold zeros
        if ROWS == 1:
            half = t
        else:
            half = t % 2
        e0 = s * 256 + 128 * half
        m0 = (e0 < K) & (t < 2 * ROWS)
        m1 = (e0 + 64 < K) & (t < 2 * ROWS)
        ma0 = m0 & (row_a < N)
        ma1 = m1 & (row_a < N)
        mb0 = m0 & (row_b < N)
        mb1 = m1 & (row_b < N)
        k0 = e0 // BLOCKSIZE
        k1 = (e0 + 64) // BLOCKSIZE
        acc_a += _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, row_a * bpr + k0, ma0,
                         DOUBLE_QUANT, INTERPRETED) * c0  # fmt: skip
        acc_a += _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, row_a * bpr + k1, ma1,
                         DOUBLE_QUANT, INTERPRETED) * c1  # fmt: skip
        acc_b += _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, row_b * bpr + k0, mb0,
                         DOUBLE_QUANT, INTERPRETED) * c2  # fmt: skip
        acc_b += _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, row_b * bpr + k1, mb1,
                         DOUBLE_QUANT, INTERPRETED) * c3  # fmt: skip
        if step_in == per - 1:  # the item's rows out: x row t // 2, of W row a from lane t % 2 = 0, b from 1
            SPAN: tl.constexpr = 4 // ROWS  # the lanes of an x row
            if ROWS == 1:
                first = t == 0
                xr = 0
            else:
                first = t % 2 == 0
                xr = t // 2
            rows = tl.where(first, row_a, row_b)
            sum_a = _sum_over_t(acc_a, NW, SPAN, INTERPRETED)
            result = tl.where(first, sum_a, _sum_over_t(acc_b, NW, SPAN, INTERPRETED))
            own = (t < 2 * ROWS) & (rows < N)
            if SPLIT_K == 1:
                _store_rows(result, rows, own, N, bias_ptr, out_ptr + xr * N, HAS_BIAS, INTERPRETED)
            else:
                tl.store(partial_ptr + (sl * ROWS + xr) * N + rows, result, mask=own)
            acc_a = zero
            acc_b = zero
        item = item1
        tile = tile1
        sl = sl1
        step_in = step1
        pa = pa1


@triton.jit
def _store_rows(result, rows, mask, N, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr):
    if HAS_BIAS:
        result += tl.load(bias_ptr + tl.minimum(rows, N - 1)).to(tl.float32)
    tl.store(out_ptr + rows, round_to(result, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def best_split(tiles: int, steps: int, slots: int) -> int:
    """The split of K (at most 32 slices, at least 2 steps each) whose (row tile, slice) items fill ``slots``
    programs in whole rounds best; a larger split only when it is 2% better."""
    best, split_k = 0.0, 1
    for split in range(1, 33):
        if split > 1 and -(-steps // split) < 2:
            break
        items = tiles * split
        fill = items / (-(-items // slots) * slots)
        if fill > best + 0.02:
            best, split_k = fill, split
    return split_k


@functools.cache  # a decode step asks for the same few shapes every token (12 us of Python a call otherwise)
def default_config(n: int, k: int, device: torch.device) -> GemvTcConfig:
    """best_split over 256-element steps: 28672x8192 gets 7 slices (1568 items, 3 rounds of 528 programs)."""
    return GemvTcConfig(split_k=best_split(-(-n // BLOCK_N), -(-k // 256), programs(device, PROGRAMS_PER_SM)))


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
    """x [M, K] (bf16/fp16, M = 1 or 2) @ W[n, K]^T (+ bias) -> [M, n] in x's dtype."""
    m, k = x.shape
    assert supported(x, k, blocksize), (x.shape, x.dtype, blocksize)
    if config is None or config.split_k == 0:
        config = GemvTcConfig(default_config(n, k, x.device).split_k, (config or GemvTcConfig()).programs_per_sm)
    if x.stride(1) != 1 or x.storage_offset() % 8 or (m > 1 and x.stride(0) % 8):  # 16-byte loads of x's rows
        x = x.clone(memory_format=torch.contiguous_format)
    codes = data.reshape(-1)
    if codes.storage_offset() % 16:
        codes = codes.clone()
    steps = -(-k // 256)
    per = -(-steps // min(config.split_k, steps))
    split_k = -(-steps // per)  # no empty slices
    items = -(-n // BLOCK_N) * split_k
    rounds = -(-items // programs(x.device, config.programs_per_sm))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split_k > 1:
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    else:  # a stand-in the kernel does not read
        partial = out
    double_quant = nested_absmax is not None
    if not double_quant:  # stand-ins (a pointer argument cannot be None)
        nested_absmax, nested_quant_map, nested_offset = absmax, quant_map, absmax
    options = {} if interpreted() else {"maxnreg": MAX_REGISTERS}
    run(
        _gemv_tc_kernel, (-(-items // rounds),), x.view(torch.int32), codes.view(torch.int32), absmax, quant_map,
        nested_absmax, nested_quant_map, nested_offset, bias if bias is not None else out, out, partial, n, k,
        x.stride(0) // 2 if m > 1 else 0, per,  # one row: the stride is unread, 0 so it never specializes a build
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        X_KIND=0 if x.dtype == torch.bfloat16 else 1, BLOCK_N=BLOCK_N, SPLIT_K=split_k, ROWS=m,
        INTERPRETED=interpreted(),
        num_warps=BLOCK_N // 16, **options,
    )  # fmt: skip
    if split_k > 1:
        sum_slices(partial, bias, out)
    return out
