"""Small batches (M = 5-16; 2-4 if called) on tensor cores: out = x @ W^T (+ bias), W read once as 4-bit codes.

gemv_tc.py's decode with rows of x in the mma's columns: each code byte is looked up once, as a pair of levels in
x's dtype, from the same per-lane table in shared memory (``gemv_tc._table``), and ``mma.sync.m16n8k16`` sums the
products. mma.py, the kernel it replaces up to 16 rows, decodes each code by byte permutes in registers and was
bound by those ALU instructions (tenth session's profile).

- A warp owns 16 rows of W; lane (g, t) = (lane / 4, lane % 4) loads 8 bytes of each 64-element block of rows g and
  g + 8 (the block's bytes 8t..8t+7, its elements 16t..16t+15), so one block is the k-range of 4 mmas: they sum
  into a fresh accumulator, which is scaled by the block's absmax once. A step is two blocks.
- The mma's 8 columns are rows of x: one n8 mma per k16 for M <= 8, two sharing the A fragment (W) for M <= 16.
  Lane (g, t) ends holding rows g, g + 8 of W against x rows 2t, 2t + 1 (and 2t + 8, 2t + 9): no cross-lane sum.
- Persistent, like gemv_tc: (row tile, K slice) items; the next step's codes are in flight while a step computes;
  a slice's sums go to a partial buffer that ``common.sum_slices`` adds in slice order (deterministic). M <= 8:
  4 programs of 8 warps an SM at 64 registers; M = 9-16 holds twice the accumulators: 3 programs at 80 registers
  (no spills at M <= 8; at M = 16 none under Triton 3.6, 8 bytes in 3.9's split-K build; at 64 registers and
  4 programs M = 16 spills 48 bytes and took 11-24% longer on Llama shapes, twenty-second session).
- Each step's 4 absmax a group (2 rows x 2 blocks) are decoded once a quad, one a lane, and shared by shuffles.
- From M = 9 (on weights of XS_MIN_PARAMS and up) x comes through shared memory: the program copies each step's
  x tile once (cp.async, a step ahead) and its warps read their fragments there, instead of each of the 8 warps
  loading the same x (twenty-second session, H200: 3-10% faster at M = 16; without any x loads at all, a bound,
  M = 16 took 35% less time on 28672x8192).
- On weights of GROUPS2_MIN_PARAMS and up a program has two groups of 128 rows (each warp 16 rows of each), and a
  block's x fragments, loaded once, feed both: half the x reads a weight (at M = 9-16 they had taken as many
  shared-memory wavefronts as the table lookups). 2 programs an SM, at 96 registers up to M = 8 (no spills) and 128
  beyond (8-16 spill bytes under Triton 3.6). H200, twenty-fifth session, against one group: M = 16 28672x8192
  0.0783 ms against 0.0860, 8192x28672 0.0699 / 0.0776, 14336x4096 0.0237 / 0.0264, 4096x14336 0.0239 / 0.0257
  (4096x4096, one group: 0.0122 / 0.0121); M = 8 0.0703 / 0.0755, 0.0649 / 0.0706, 0.0218 / 0.0238, 0.0228 /
  0.0241; M = 5 2-5%.

H200, one process, CUDA graphs, against mma.py (docs/BENCHMARKS_GPU.md, fourteenth session): M = 2 on 28672x8192
0.0734 ms against 0.1036 (bf16 0.1087), 8192x28672 0.0685 against 0.1019; M = 8 0.0851 / 0.0766 against
0.1043 / 0.1028; M = 16 0.1087 / 0.1010 against 0.1051 / 0.1038. Faster than mma.py at M <= 8 on every Llama
shape tried (4-33%), at M = 16 on 5 of 7 (2-10%; 3-5% slower on 28672x8192 and 1024x4096). ops sends M = 5-16 here
(M = 2-4 to gemv_tc, whose mma columns hold up to four rows of x beside the blocks: 4-25% faster on 10 Llama
shapes, twentieth session), under torch.compile through ``nf4::matmul_table`` (as gemv_tc: the register cap).

Under the interpreter the lookups and mmas are gemv_tc's CPU forms (a computed pair, an einsum over fragments).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nf4.kernels.common import ampere_or_newer, interpreted, programs, round_to, run, sum_slices
from nf4.kernels.common import load_absmax as _absmax
from nf4.kernels.gemv import _load16
from nf4.kernels.gemv_tc import _from_quad, _lookup4, _mma, _table, best_split

BLOCK_N = 128  # rows of W a group (8 warps); a program has one group, or two
# Weights from which a program takes two groups (each warp 32 rows, x's fragments loaded once for both): H200,
# twenty-fifth session, M = 16 7-10% faster on 14336x4096 and up, 2% slower on 4096x4096; M = 8 5-8%, M = 5 2-5%.
GROUPS2_MIN_PARAMS = 1 << 25
# Weights from which M = 9-16 read x through shared memory (_x_buffers): 3-10% faster on 4096x4096 and up
# (H200, twenty-second session), 2.5% slower on 1024x4096; 5-25% slower at M = 5-8, whose loads of x are half.
XS_MIN_PARAMS = 1 << 23
MIN_M = 2
MAX_M = 16


@dataclass(frozen=True)
class GemvTcmConfig:
    """K cut into split_k slices (0: chosen so that the items fill the grid in whole rounds); programs an SM and
    the register cap that lets them fit; row groups a program, 1 or 2 (0: by M and size, see the module
    docstring)."""

    split_k: int = 0
    programs_per_sm: int = 0
    max_registers: int = 0
    groups: int = 0


def supported(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """2-16 rows of bf16/fp16 x, rows of whole 64-element blocks (a block is the k-range of 4 mmas), on an Ampere or
    newer GPU."""
    return (
        MIN_M <= x.shape[0] <= MAX_M
        and x.dtype in (torch.bfloat16, torch.float16)
        and k % 64 == 0
        and blocksize % 64 == 0
        and ampere_or_newer(x.device)
    )


# The 2 code words at ptr (8-byte aligned), 0 where masked; read once, so not kept in L1.
@triton.jit
def _codes8(ptr, mask, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        w0 = tl.load(ptr, mask=mask, other=0)
        w1 = tl.load(ptr + 1, mask=mask, other=0)
    else:
        w0, w1 = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b32 $0, 0; mov.b32 $1, 0;"
            " @p ld.global.nc.L1::no_allocate.v2.b32 {$0, $1}, [$2]; }",
            "=r,=r,l,r", [ptr, mask.to(tl.int32)], dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
        )  # fmt: skip
    return w0, w1


# x through shared memory (M = 9-16 on weights of at least XS_MIN_PARAMS): the program's 256 threads copy a step's
# x tile (16 rows x 128 elements) once, 16 bytes each by cp.async (zero-filled past M rows or K), into one of two
# buffers of 16 rows x 272 bytes (a row's 256 bytes + 16, so a quad's 16-byte reads fall in distinct banks); at the
# top of each step the program waits for its copy and synchronizes (which also frees the other buffer, read the step
# before, for the next step's copy), and each warp reads its fragments by ld.shared. Otherwise each of the 8 warps
# loaded the same x from L1/L2 itself. (An array declared by inline PTX, as _table's: one instance a kernel.)
@triton.jit
def _x_buffers(i):  # 8704 = 2 buffers x 16 rows x 272 bytes (the kernel's XS_ROW)
    return tl.inline_asm_elementwise(".shared .align 16 .b8 nf4_xs[8704]; mov.u32 $0, nf4_xs;", "=r,r", [i],
                                     dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


# Thread i's 16 bytes of step s's x tile (chunk i % 16 of x row i // 16; src: that chunk's first word at step 0)
# into the buffer at dst, zero-filled for rows past M, past K, or where not live.
@triton.jit
def _stage(dst, src, row, chunk, s, live, M, K):
    mask = (row < M) & (s * 128 + chunk * 8 < K) & live
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 n; setp.ne.b32 p, $3, 0; selp.b32 n, 16, 0, p;"
        " cp.async.cg.shared.global [$1], [$2], 16, n; cp.async.commit_group; mov.b32 $0, 0; }",
        "=r,r,l,r", [dst, src + s * 64, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


# The staged buffer at addr, once this thread's copies have landed and every thread of the program is here.
@triton.jit
def _wait_staged(addr):
    return tl.inline_asm_elementwise("cp.async.wait_group 0; bar.sync 0; mov.b32 $0, $1;", "=r,r", [addr],
                                     dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _lds16(addr):
    return tl.inline_asm_elementwise("ld.shared.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,r", [addr],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)  # fmt: skip


# The lane's 16 elements of an x row for one block (8 words): from the staged tile at shared address xs (XS) or
# from global memory (0 where masked).
@triton.jit
def _x_row(x_ptr, mask, xs, XS: tl.constexpr, INTERPRETED: tl.constexpr):
    if XS:
        w0, w1, w2, w3 = _lds16(xs)
        w4, w5, w6, w7 = _lds16(xs + 16)
    else:
        w0, w1, w2, w3 = _load16(x_ptr, mask, INTERPRETED)
        w4, w5, w6, w7 = _load16(x_ptr + 4, mask, INTERPRETED)
    return w0, w1, w2, w3, w4, w5, w6, w7


# The lane's x fragments for one block: x rows g and (HALVES = 2) g + 8, 8 words each, from global memory or (XS)
# from the staged tile at shared addresses xs_a / xs_b; the second row's words are the first's where HALVES = 1.
@triton.jit
def _x_frags(x_ptr, xm, x_ptr2, xm2, xs_a, xs_b, HALVES: tl.constexpr, XS: tl.constexpr, INTERPRETED: tl.constexpr):
    x0, x1, x2, x3, x4, x5, x6, x7 = _x_row(x_ptr, xm, xs_a, XS, INTERPRETED)
    if HALVES == 2:
        y0, y1, y2, y3, y4, y5, y6, y7 = _x_row(x_ptr2, xm2, xs_b, XS, INTERPRETED)
    else:
        y0, y1, y2, y3, y4, y5, y6, y7 = x0, x1, x2, x3, x4, x5, x6, x7
    return x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7


# One block of one 16-row group: the lane's codes of rows a and b (2 words each) against its x fragments (x rows g,
# and g + 8 where HALVES = 2), 4 mmas (8). mma j takes bytes 2j and 2j + 1 of the lane's 8: its k = 2t, 2t + 1 are
# byte 2j's elements, and x word 2j holds the same two elements; k = 2t + 8, 2t + 9 are byte 2j + 1's.
@triton.jit
def _block(wa0, wa1, wb0, wb1, x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7, lane8, base,
           quant_map_ptr, NW: tl.constexpr, X_KIND: tl.constexpr, HALVES: tl.constexpr,
           INTERPRETED: tl.constexpr):  # fmt: skip
    zero = tl.zeros(wa0.shape, tl.float32)
    a0, a1, a2, a3 = _lookup4(wa0, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    a4, a5, a6, a7 = _lookup4(wa1, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    b0, b1, b2, b3 = _lookup4(wb0, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    b4, b5, b6, b7 = _lookup4(wb1, lane8, base, quant_map_ptr, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a0, b0, a1, b1, x0, x1, zero, zero, zero, zero, NW, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a2, b2, a3, b3, x2, x3, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a4, b4, a5, b5, x4, x5, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    c0, c1, c2, c3 = _mma(a6, b6, a7, b7, x6, x7, c0, c1, c2, c3, NW, X_KIND, INTERPRETED)
    if HALVES == 2:
        d0, d1, d2, d3 = _mma(a0, b0, a1, b1, y0, y1, zero, zero, zero, zero, NW, X_KIND, INTERPRETED)
        d0, d1, d2, d3 = _mma(a2, b2, a3, b3, y2, y3, d0, d1, d2, d3, NW, X_KIND, INTERPRETED)
        d0, d1, d2, d3 = _mma(a4, b4, a5, b5, y4, y5, d0, d1, d2, d3, NW, X_KIND, INTERPRETED)
        d0, d1, d2, d3 = _mma(a6, b6, a7, b7, y6, y7, d0, d1, d2, d3, NW, X_KIND, INTERPRETED)
    else:
        d0, d1, d2, d3 = zero, zero, zero, zero
    return c0, c1, c2, c3, d0, d1, d2, d3


# _block's sums added into one group's 8 accumulators, each scaled by its block's absmax: block `half` of rows a
# and b, decoded by lanes 2 * half and 2 * half + 1 of the quad (am).
@triton.jit
def _block_into(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, wa0, wa1, wb0, wb1, x0, x1, x2, x3, x4, x5, x6, x7,
                y0, y1, y2, y3, y4, y5, y6, y7, am, half: tl.constexpr, lane8, base, quant_map_ptr, NW: tl.constexpr,
                X_KIND: tl.constexpr, HALVES: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    c0, c1, c2, c3, d0, d1, d2, d3 = _block(wa0, wa1, wb0, wb1, x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5,
                                            y6, y7, lane8, base, quant_map_ptr, NW, X_KIND, HALVES,
                                            INTERPRETED)  # fmt: skip
    am_a = _from_quad(am, 2 * half, NW, INTERPRETED)
    am_b = _from_quad(am, 2 * half + 1, NW, INTERPRETED)
    acc0 += am_a * c0
    acc1 += am_a * c1
    acc2 += am_b * c2
    acc3 += am_b * c3
    if HALVES == 2:
        acc4 += am_a * d0
        acc5 += am_a * d1
        acc6 += am_b * d2
        acc7 += am_b * d3
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


# One group's 8 sums (W rows a, b against x rows 2t, 2t + 1 and, HALVES = 2, 2t + 8, 2t + 9) out.
@triton.jit
def _out_group(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, t, row_a, N, M, slice_ptr, bias_ptr, out_ptr,
               HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, HALVES: tl.constexpr,
               INTERPRETED: tl.constexpr):  # fmt: skip
    m0 = 2 * t
    row_b = row_a + 8
    own_a = row_a < N
    own_b = row_b < N
    _out_rows(acc0, m0, row_a, own_a, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
    _out_rows(acc1, m0 + 1, row_a, own_a, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
    _out_rows(acc2, m0, row_b, own_b, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
    _out_rows(acc3, m0 + 1, row_b, own_b, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
    if HALVES == 2:
        _out_rows(acc4, m0 + 8, row_a, own_a, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
        _out_rows(acc5, m0 + 9, row_a, own_a, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
        _out_rows(acc6, m0 + 8, row_b, own_b, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)
        _out_rows(acc7, m0 + 9, row_b, own_b, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS, SPLIT, INTERPRETED)


# One output row's sums of W rows `rows` against x row m: to the slice's partial rows (SPLIT), or out (+ bias).
@triton.jit
def _out_rows(v, m, rows, own, N, M, slice_ptr, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
              INTERPRETED: tl.constexpr):  # fmt: skip
    mask = own & (m < M)
    if SPLIT:
        tl.store(slice_ptr + m * N + rows, v, mask=mask)
    else:
        if HAS_BIAS:
            v += tl.load(bias_ptr + tl.minimum(rows, N - 1)).to(tl.float32)
        tl.store(out_ptr + m * N + rows, round_to(v, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


# The lane's codes of a step (2 blocks) for rows r and r + 8: (a0, a1, b0, b1) of the first block, then the second's.
@triton.jit
def _step_codes(pa, s, wpr, live, row, N, INTERPRETED: tl.constexpr):
    pb = pa + 8 * wpr
    in0 = live & (row * 0 + s * 16 < wpr)  # per-lane tensors: the interpreter rejects a mask made with a scalar
    in1 = live & (row * 0 + s * 16 + 8 < wpr)
    a0, a1 = _codes8(pa + s * 16, in0 & (row < N), INTERPRETED)
    b0, b1 = _codes8(pb + s * 16, in0 & (row + 8 < N), INTERPRETED)
    c0, c1 = _codes8(pa + s * 16 + 8, in1 & (row < N), INTERPRETED)
    d0, d1 = _codes8(pb + s * 16 + 8, in1 & (row + 8 < N), INTERPRETED)
    return a0, a1, b0, b1, c0, c1, d0, d1


@triton.jit
def _gemv_tcm_kernel(
    x_ptr, data_ptr, absmax_ptr, quant_map_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
    bias_ptr, out_ptr, partial_ptr, M, N, K, stride_xw, per,
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, HALVES: tl.constexpr, GROUPS: tl.constexpr, XS: tl.constexpr,
    INTERPRETED: tl.constexpr,
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
    steps = tl.cdiv(K, 128)
    n_tiles = tl.cdiv(N, BLOCK_N * GROUPS)
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    total = tl.cdiv(n_tiles * SPLIT_K - pid, G) * per  # this program's steps
    lane8 = lane * 8
    zero = tl.zeros([THREADS], tl.float32)
    base = _table(quant_map_ptr, i, NW, X_KIND, INTERPRETED)
    G2: tl.constexpr = BLOCK_N  # the second group's rows are BLOCK_N on from the first's

    acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = zero, zero, zero, zero, zero, zero, zero, zero
    if GROUPS == 2:
        acc8, acc9, acc10, acc11, acc12, acc13, acc14, acc15 = zero, zero, zero, zero, zero, zero, zero, zero
    item = pid
    tile = pid % n_tiles
    sl = pid // n_tiles
    step_in = 0
    row_a = tile * (BLOCK_N * GROUPS) + warp * 16 + g
    pa = data_ptr + row_a.to(tl.int64) * wpr + 2 * t
    live = i * 0 + total > 0
    na0, na1, nb0, nb1, nc0, nc1, nd0, nd1 = _step_codes(pa, sl * per, wpr, live, row_a, N, INTERPRETED)
    if GROUPS == 2:
        ma0, ma1, mb0, mb1, mc0, mc1, md0, md1 = _step_codes(pa + G2 * wpr, sl * per, wpr, live, row_a + G2, N,
                                                             INTERPRETED)  # fmt: skip
    xa = x_ptr + g * stride_xw + 8 * t  # x row g (the mma's column g), and row g + 8 for the second n8 mma
    xb = xa + 8 * stride_xw
    XS_ROW: tl.constexpr = 272  # bytes a staged x row; _x_buffers holds two buffers of 16 rows
    XS_BUF: tl.constexpr = 16 * XS_ROW
    if XS:  # thread i copies 16 bytes (chunk i % 16) of x row i // 16 of each step; lane (g, t) reads rows g, g + 8
        xs0 = _x_buffers(i)
        st_row = i // 16
        st_chunk = i % 16
        st_src = x_ptr + tl.minimum(st_row, M - 1) * stride_xw + st_chunk * 4
        st_dst = xs0 + st_row * XS_ROW + st_chunk * 16
        _stage(st_dst, st_src, st_row, st_chunk, sl * per, live, M, K)
        rd_a = g * XS_ROW + 32 * t
    else:
        xs0 = i * 0
        rd_a = i * 0
    for it in range(0, total):
        s = sl * per + step_in
        if XS:  # this step's tile: buffer it % 2
            cur = _wait_staged(xs0 + (it % 2) * XS_BUF)
        else:
            cur = i * 0
        row_a = tile * (BLOCK_N * GROUPS) + warp * 16 + g
        qa0, qa1, qb0, qb1, qc0, qc1, qd0, qd1 = na0, na1, nb0, nb1, nc0, nc1, nd0, nd1
        if GROUPS == 2:
            ua0, ua1, ub0, ub1, uc0, uc1, ud0, ud1 = ma0, ma1, mb0, mb1, mc0, mc1, md0, md1
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
            r1 = tile1 * (BLOCK_N * GROUPS) + warp * 16 + g
            pa1 = data_ptr + r1.to(tl.int64) * wpr + 2 * t
        s1 = sl1 * per + step1
        live = (i * 0 + it + 1 < total) & (i * 0 + s1 < steps)
        na0, na1, nb0, nb1, nc0, nc1, nd0, nd1 = _step_codes(pa1, s1, wpr, live, r1, N, INTERPRETED)
        if GROUPS == 2:
            ma0, ma1, mb0, mb1, mc0, mc1, md0, md1 = _step_codes(pa1 + G2 * wpr, s1, wpr, live, r1 + G2, N,
                                                                 INTERPRETED)  # fmt: skip
        if XS:  # the next step's tile into the other buffer (free: every thread passed this step's barrier)
            _stage(st_dst + ((it + 1) % 2) * XS_BUF, st_src, st_row, st_chunk, s1, live, M, K)
        # the step's 4 absmax a group (rows a, b x its 2 blocks), one a lane: lane t decodes row a (t even) or b
        # (t odd) of block t // 2, and its quad shares them. Until the twenty-second session each lane decoded all
        # 4: 418 SASS instructions a step at M = 16 with double quant (Triton 3.6), then 351 (M = 8: 363 -> 298),
        # and 5-13% faster at M = 5-16 on Llama shapes (H200, docs/BENCHMARKS_GPU.md), same bits
        row_t = row_a + 8 * (t % 2)
        e_t = s * 128 + 64 * (t // 2)
        am = _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
                     row_t * bpr + e_t // BLOCKSIZE, (e_t < K) & (row_t < N), DOUBLE_QUANT, INTERPRETED)  # fmt: skip
        if GROUPS == 2:
            am2 = _absmax(absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
                          (row_t + G2) * bpr + e_t // BLOCKSIZE, (e_t < K) & (row_t + G2 < N), DOUBLE_QUANT,
                          INTERPRETED)  # fmt: skip
        for half in tl.static_range(2):  # the step's two blocks
            e = s * 128 + 64 * half
            inside = (i * 0 + e) < K
            if half == 0:
                wa0, wa1, wb0, wb1 = qa0, qa1, qb0, qb1
            else:
                wa0, wa1, wb0, wb1 = qc0, qc1, qd0, qd1
            # x's fragments once, for both groups
            x0, x1, x2, x3, x4, x5, x6, x7, y0, y1, y2, y3, y4, y5, y6, y7 = _x_frags(
                xa + e // 2, inside & (g < M), xb + e // 2, inside & (g + 8 < M), cur + rd_a + 128 * half,
                cur + rd_a + 8 * XS_ROW + 128 * half, HALVES, XS, INTERPRETED,
            )  # fmt: skip
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _block_into(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, wa0, wa1, wb0, wb1, x0, x1, x2, x3, x4, x5, x6, x7, y0,
                y1, y2, y3, y4, y5, y6, y7, am, half, lane8, base, quant_map_ptr, NW, X_KIND, HALVES, INTERPRETED,
            )  # fmt: skip
            if GROUPS == 2:
                if half == 0:
                    va0, va1, vb0, vb1 = ua0, ua1, ub0, ub1
                else:
                    va0, va1, vb0, vb1 = uc0, uc1, ud0, ud1
                acc8, acc9, acc10, acc11, acc12, acc13, acc14, acc15 = _block_into(
                    acc8, acc9, acc10, acc11, acc12, acc13, acc14, acc15, va0, va1, vb0, vb1, x0, x1, x2, x3, x4, x5,
                    x6, x7, y0, y1, y2, y3, y4, y5, y6, y7, am2, half, lane8, base, quant_map_ptr, NW, X_KIND, HALVES,
                    INTERPRETED,
                )  # fmt: skip
        if step_in == per - 1:  # lane (g, t): W rows g (acc0, 1), g + 8 (acc2, 3) against x rows 2t, 2t + 1 (+ 8)
            slice_ptr = partial_ptr + sl * M * N
            split: tl.constexpr = SPLIT_K > 1
            _out_group(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, t, row_a, N, M, slice_ptr, bias_ptr, out_ptr,
                       HAS_BIAS, split, HALVES, INTERPRETED)  # fmt: skip
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = zero, zero, zero, zero, zero, zero, zero, zero
            if GROUPS == 2:
                _out_group(acc8, acc9, acc10, acc11, acc12, acc13, acc14, acc15, t, row_a + G2, N, M, slice_ptr,
                           bias_ptr, out_ptr, HAS_BIAS, split, HALVES, INTERPRETED)  # fmt: skip
                acc8, acc9, acc10, acc11, acc12, acc13, acc14, acc15 = zero, zero, zero, zero, zero, zero, zero, zero
        item = item1
        tile = tile1
        sl = sl1
        step_in = step1
        pa = pa1


def _occupancy(m: int, groups: int) -> tuple[int, int]:
    """(programs an SM, register cap) for m rows of x: one n8 mma a k16 up to 8 rows, two beyond; two groups hold
    twice the accumulators and codes."""
    if groups == 2:
        return (2, 96) if m <= 8 else (2, 128)
    return (4, 64) if m <= 8 else (3, 80)


@functools.cache  # a decode step asks for the same few shapes every token
def default_config(n: int, k: int, m: int, device: torch.device) -> GemvTcmConfig:
    """gemv_tc's best_split over 128-element steps, at the occupancy for m rows and the groups for the size."""
    groups = 2 if n * k >= GROUPS2_MIN_PARAMS else 1
    programs_per_sm, max_registers = _occupancy(m, groups)
    split_k = best_split(-(-n // (BLOCK_N * groups)), -(-k // 128), programs(device, programs_per_sm))
    return GemvTcmConfig(split_k, programs_per_sm, max_registers, groups)


def gemv_tcm(
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
    config: GemvTcmConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16, 2 <= M <= 16) @ W[n, K]^T (+ bias) -> [M, n] in x's dtype."""
    m, k = x.shape
    assert supported(x, k, blocksize), (x.shape, x.dtype, blocksize)
    default = default_config(n, k, m, x.device)
    config = config or default
    split_k = config.split_k or default.split_k
    groups = config.groups or default.groups
    occupancy = _occupancy(m, groups)
    programs_per_sm = config.programs_per_sm or occupancy[0]
    max_registers = config.max_registers or occupancy[1]
    if x.stride(1) != 1 or x.storage_offset() % 8 or x.stride(0) % 8:  # 16-byte loads of x's rows
        x = x.clone(memory_format=torch.contiguous_format)
    codes = data.reshape(-1)
    if codes.storage_offset() % 16:
        codes = codes.clone()
    steps = -(-k // 128)
    per = -(-steps // min(split_k, steps))
    split_k = -(-steps // per)  # no empty slices
    items = -(-n // (BLOCK_N * groups)) * split_k
    rounds = -(-items // programs(x.device, programs_per_sm))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split_k > 1:
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    else:  # a stand-in the kernel does not read
        partial = out
    double_quant = nested_absmax is not None
    if not double_quant:  # stand-ins (a pointer argument cannot be None)
        nested_absmax, nested_quant_map, nested_offset = absmax, quant_map, absmax
    options = {} if interpreted() else {"maxnreg": max_registers}
    run(
        _gemv_tcm_kernel, (-(-items // rounds),), x.view(torch.int32), codes.view(torch.int32), absmax, quant_map,
        nested_absmax, nested_quant_map, nested_offset, bias if bias is not None else out, out, partial, m, n, k,
        x.stride(0) // 2, per,
        BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        X_KIND=0 if x.dtype == torch.bfloat16 else 1, BLOCK_N=BLOCK_N, SPLIT_K=split_k, HALVES=2 if m > 8 else 1,
        GROUPS=groups, XS=m > 8 and n * k >= XS_MIN_PARAMS and not interpreted(),
        INTERPRETED=interpreted(), num_warps=BLOCK_N // 16, **options,
    )  # fmt: skip
    if split_k > 1:
        sum_slices(partial, bias, out)
    return out
