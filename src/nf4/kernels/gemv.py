"""Fused dequantize-matmul for decode (M = 1..4, FMAs): out = x @ W^T (+ bias), W streamed once as 4-bit codes.

At M = 1 the product is bound by streaming W: 0.5 byte/param (+ absmax) instead of bf16's 2, so the ceiling
is ~3.9x bf16's speed. Each program owns BLOCK_N rows of W and one of SPLIT_K slices of K; it decodes a
[BLOCK_N, NBK, blocksize/8] tile of code words per step in registers and never writes W out. What the H200
sweeps taught (docs/BENCHMARKS_GPU.md):
- through the steps below the time followed the instructions a weight (nibble, lookup, x's bf16 -> fp32, fma),
  not the bytes;
- the codes are read as int32 words and each nibble is shifted in its register: 4-8% faster than bytes
  unpacked one by one (SASS: 258 instructions for 32 weights a thread against 278);
- a lookup is one warp shuffle (``shfl.sync.idx``: lane l holds level l % 16, the code names the lane; no
  mask, no shared memory, no barrier): 219 instructions, 5-7% faster on the 70B shapes than the shared-memory
  ``tl.gather`` (a table store and two barriers a step). Under the interpreter the lookup is a ``tl.gather``;
- a thread holds 4 rows of the same code words, so x's conversions serve 4 rows: 4.4 instructions a weight,
  12-18% faster than one row a thread at M = 1 on the 8B/70B MLP shapes, 32-39% faster at M = 3 (fp32 x);
- x is read in the layout of the code tile, a code word's 8 elements in one 16-byte load (4 words of two
  bf16/fp16: word 4w + v beside byte v of code word w), so nothing changes layout inside the loop;
- the products of a word are summed as fma chains, and the absmax multiplies a block's sum once;
- split-K: with one program per row tile, the GPU holds too few loads in flight (N = 4096 gives 128 programs).
  The slices' fp32 sums go to a [SPLIT_K, M, N] buffer; the last program of a row tile to finish adds them
  up in slice order (common.store_tile), so the result does not depend on timing.
- profiled (ncu, 28672x8192): 95 registers a thread (20 one-warp programs an SM), the L1 data pipe (which
  the shuffles and loads share) 82% busy, DRAM 35%; with the lookups, absmax and x loads all removed, the
  kernel still took 0.053-0.055 ms of 0.073: the code stream alone does not reach the copy bandwidth;
- and measured slower: lookups by byte permutes (the work moves to the ALU pipe, 74% busy: 19-34% slower),
  codes by TMA with 3-6 pipeline stages (7-35%, more stages slower), the absmax loaded a step ahead (1-23%:
  the 20 warps an SM already hide it).

Needs K % blocksize == 0 (a row is whole blocks); other shapes take dequantize + cuBLAS (gemm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nf4.kernels.common import interpreted, launch, load_absmax, store_tile, tracing


# Each code word's 8 elements of x come in one 16-byte load (two for fp32 x): x is passed as int32 words, and the
# 4 scalar loads Triton emits for 4 words become one (H200, M = 1: 3% faster on 8192x28672, within 2% elsewhere).
# PLAIN: four tl.loads instead, under the interpreter (no inline PTX) and under torch.compile, whose analysis of a
# kernel's writes rejects inline PTX that takes a pointer. STREAM: data read once (gemv_tc's codes), not kept in L1.
@triton.jit
def _load16(ptr, mask, PLAIN: tl.constexpr, STREAM: tl.constexpr = False):
    """The 4 int32 words at ptr (16-byte aligned), 0 where masked."""
    if PLAIN:
        w0 = tl.load(ptr, mask=mask, other=0)
        w1 = tl.load(ptr + 1, mask=mask, other=0)
        w2 = tl.load(ptr + 2, mask=mask, other=0)
        w3 = tl.load(ptr + 3, mask=mask, other=0)
    else:
        if STREAM:
            load: tl.constexpr = " @p ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4]; }"
        else:
            load: tl.constexpr = " @p ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4]; }"
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;"
            + load, "=r,=r,=r,=r,l,r", [ptr, mask.to(tl.int32)], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1,
        )  # fmt: skip
    return w0, w1, w2, w3


# What x's int32 words hold, per x dtype (the kernel's X_KIND).
_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


# A word of two bf16/fp16 elements (low half first) -> both in fp32.
@triton.jit
def _pair(word, X_KIND: tl.constexpr):
    if X_KIND == 0:  # bf16 -> fp32 is the 16 bits placed high
        first = (word << 16).to(tl.float32, bitcast=True)
        second = ((word >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        first = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        second = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return first, second


# x[8w .. 8w + 7] in fp32 for code words w (x_ptr: the row's int32 words), ordered as _word_products takes them:
# (x[2j], x[2j + 1]) for byte v of the word, j = 4w + v.
@triton.jit
def _x_step(x_ptr, word, mask, X_KIND: tl.constexpr, PLAIN_LOADS: tl.constexpr):
    if X_KIND == 2:  # fp32: a word is an element
        e0, o0, e1, o1 = _load16(x_ptr + 8 * word, mask, PLAIN_LOADS)
        e2, o2, e3, o3 = _load16(x_ptr + 8 * word + 4, mask, PLAIN_LOADS)
        f32: tl.constexpr = tl.float32
        xe0, xo0 = e0.to(f32, bitcast=True), o0.to(f32, bitcast=True)
        xe1, xo1 = e1.to(f32, bitcast=True), o1.to(f32, bitcast=True)
        xe2, xo2 = e2.to(f32, bitcast=True), o2.to(f32, bitcast=True)
        xe3, xo3 = e3.to(f32, bitcast=True), o3.to(f32, bitcast=True)
    else:
        w0, w1, w2, w3 = _load16(x_ptr + 4 * word, mask, PLAIN_LOADS)
        xe0, xo0 = _pair(w0, X_KIND)
        xe1, xo1 = _pair(w1, X_KIND)
        xe2, xo2 = _pair(w2, X_KIND)
        xe3, xo3 = _pair(w3, X_KIND)
    return xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3


# level[code & 15] as fp32. On the GPU from the warp's lanes: lut is this lane's level l % 16 (as bits) and shfl
# reads lane (code & 31) itself, so the bits above the nibble need no mask (lanes 16-31 hold the same levels); lut
# must stay in the layout it was made in (the codes' load), or a lane would hold another's level. Interpreted
# (no inline PTX on CPU), lut is the 16-entry table and the level a gather.
@triton.jit
def _level(lut, code, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        level = tl.reshape(tl.gather(lut, tl.reshape(code & 15, (code.numel,)), 0), code.shape)
    else:
        bits = tl.inline_asm_elementwise(
            "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [lut, code],
            dtype=tl.int32, is_pure=True, pack=1,
        )  # fmt: skip
        level = bits.to(tl.float32, bitcast=True)
    return level


# The products of one step for one row of x: sum over the 4 bytes v of a code word of
#   level[hi nibble] * x[2j] + level[lo nibble] * x[2j + 1]        (j = 4 * word + v; fp32 fma chains)
# levels: [BLOCK_N, NBK, HW, 2 (hi, lo), 2 (v & 1), 2 (v >> 1)], the step's looked-up levels; xe/xo: the x pairs
# of byte position v, [NBK, HW] each.
@triton.jit
def _word_products(levels, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3):
    lv01, lv23 = tl.split(levels)
    lv0, lv1 = tl.split(lv01)
    lv2, lv3 = tl.split(lv23)
    h0, l0 = tl.split(lv0)
    h1, l1 = tl.split(lv1)
    h2, l2 = tl.split(lv2)
    h3, l3 = tl.split(lv3)
    part = h0 * xe0[None] + l0 * xo0[None] + h1 * xe1[None] + l1 * xo1[None]
    return part + h2 * xe2[None] + l2 * xo2[None] + h3 * xe3[None] + l3 * xo3[None]


# Step s of a program covers blocks [s*NBK, (s+1)*NBK) of its rows. The codes come as int32 words in the load's
# layout (4 words, 16 bytes, a thread): byte v of a word is bits 8v..8v+7, its high nibble the code of element 2j,
# its low nibble that of 2j + 1. Every nibble is shifted in its register and looked up by a warp shuffle, and a
# code word's 8 elements of x come in one 16-byte load in the codes' layout (_x_step), so nothing changes layout
# inside the loop. For each row m of x:
#   acc[n, m] += sum_b absmax[n, b] * sum over the block's words of _word_products        (fp32)
# (at M = 1 the sum over b waits until the end). The codes are decoded once for all M rows.
@triton.jit
def _gemv_kernel(
    x_ptr,
    data_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    nested_offset_ptr,
    bias_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    K,
    stride_x,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_KIND: tl.constexpr,  # x's int32 words hold 0: bf16 pairs, 1: fp16 pairs, 2: fp32 elements
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NBK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SUM_IN_KERNEL: tl.constexpr,
    PREFETCH: tl.constexpr,
    PLAIN_LOADS: tl.constexpr,  # x by tl.load (interpreter, torch.compile), not inline PTX (_load16)
    INTERPRETED: tl.constexpr,
):
    HW: tl.constexpr = BLOCKSIZE // 8  # code words a block
    BKW: tl.constexpr = NBK * HW
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(rows, N - 1)  # rows past N repeat the last one; their results are not stored
    blocks_per_row = K // BLOCKSIZE
    words_per_row = blocks_per_row * HW
    steps = tl.cdiv(blocks_per_row, NBK)
    per_split = tl.cdiv(steps, SPLIT_K)
    s0 = tl.program_id(1) * per_split
    s1 = tl.minimum(s0 + per_split, steps)
    wd = tl.arange(0, NBK)[:, None] * HW + tl.arange(0, HW)[None, :]  # [NBK, HW] word of the step
    kb = tl.arange(0, NBK)
    mcol = tl.arange(0, BLOCK_M)
    word_ptr = data_ptr + rn.to(tl.int64)[:, None, None] * words_per_row + wd[None, :, :]
    zero = tl.zeros((BLOCK_N, NBK, HW), tl.int32)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, NBK), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    # A partial last step (blocks_per_row % NBK) is masked per word, which keeps the loads 16 bytes wide.
    nxt = tl.load(word_ptr + s0 * BKW, mask=zero + s0 * BKW + wd < words_per_row, other=0)
    if INTERPRETED:
        lut = tl.load(quant_map_ptr + tl.arange(0, 16))
    else:  # made from the codes' tile, so in its layout: lane l's level is level[l % 16]
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [nxt], dtype=tl.int32, is_pure=True, pack=1)
        lut = tl.load(quant_map_ptr + (lane & 15)).to(tl.int32, bitcast=True)
    for s in range(s0, s1):
        word = s * BKW + wd  # [NBK, HW]
        in_row = word < words_per_row
        if PREFETCH:  # the next step's codes are in flight while this step computes
            codes = nxt
            nxt_mask = (zero + word + BKW < words_per_row) & (zero + s + 1 < s1)
            nxt = tl.load(word_ptr + (s + 1) * BKW, mask=nxt_mask, other=0, eviction_policy="evict_first")
        else:
            codes = tl.load(
                word_ptr + s * BKW, mask=zero + word < words_per_row, other=0, eviction_policy="evict_first"
            )
        lv0 = tl.join(_level(lut, codes >> 4, INTERPRETED), _level(lut, codes, INTERPRETED))
        lv1 = tl.join(_level(lut, codes >> 12, INTERPRETED), _level(lut, codes >> 8, INTERPRETED))
        lv2 = tl.join(_level(lut, codes >> 20, INTERPRETED), _level(lut, codes >> 16, INTERPRETED))
        lv3 = tl.join(_level(lut, codes >> 28, INTERPRETED), _level(lut, codes >> 24, INTERPRETED))
        levels = tl.join(tl.join(lv0, lv1), tl.join(lv2, lv3))
        blk = s * NBK + kb
        blk_mask = (rn >= 0)[:, None] & (blk < blocks_per_row)[None, :]  # rn >= 0 (always): the rows axis
        absmax = load_absmax(
            absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr,
            rn[:, None] * blocks_per_row + blk[None, :], blk_mask, DOUBLE_QUANT, INTERPRETED,
        )  # fmt: skip
        for m in tl.static_range(BLOCK_M):
            x_row = x_ptr + m * stride_x
            x_mask = in_row if BLOCK_M == 1 else in_row & (word * 0 + m < M)
            xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3 = _x_step(x_row, word, x_mask, X_KIND, PLAIN_LOADS)
            block_sum = tl.sum(_word_products(levels, xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3), axis=2)
            if BLOCK_M == 1:
                acc += block_sum * absmax
            else:
                row_sum = tl.sum(block_sum * absmax, axis=1)
                acc = tl.where(mcol[None, :] == m, acc + row_sum[:, None], acc)
    if BLOCK_M == 1:
        result = tl.sum(acc, axis=1)[:, None]  # [BLOCK_N, 1]
    else:
        result = acc
    store_tile(
        result, rows, mcol, M, N, bias_ptr, out_ptr, partial_ptr, counter_ptr, HAS_BIAS, SPLIT_K, SUM_IN_KERNEL,
        INTERPRETED,
    )  # fmt: skip


@dataclass(frozen=True)
class GemvConfig:
    """BLOCK_N rows of W per program, NBK blocks of K per step, K cut into split_k slices."""

    block_n: int = 32
    nbk: int = 2
    num_warps: int = 1
    split_k: int = 1
    prefetch: bool = True


# Tiles and programs (H200, shuffle lookups, weights rotated past L2, ms). A warp takes 32 rows, 4 a thread, so each
# thread converts x's words once for 4 rows (SASS: 4.4 instructions a weight against 6.8 with one row a thread);
# 64 rows a warp or over two warps were no faster, nor tiles with K across the lanes (16-512 bytes of a row a load).
# Split-K is doubled up to 4096 programs, at most 16 slices (a tile's last program adds them one after another:
# 32 were 11% slower on 4096x14336) and at least 2 steps a slice. That rule, against >= 4 steps a slice: 4096x4096
# 0.0094 / 0.0099, 1024x4096 0.0058 / 0.0077, 1000x4160 0.0069 / 0.0085, the 70B and 8B MLP shapes unchanged, the
# 8B decode step 3.07 / 3.22 ms; fp32 x at M = 3 won on narrow shapes (1000x4160 0.0105 / 0.0141) and lost on
# 4097x4160 (0.0253 / 0.0198) and 4100x4096 (0.0200 / 0.0180). docs/BENCHMARKS_GPU.md, "Ninth session".
_TARGET_PROGRAMS = 4096
_MAX_SPLIT_K = 16
_MIN_STEPS_PER_SLICE = 2


def default_config(n: int, k: int, blocksize: int) -> GemvConfig:
    """64 bytes of codes a row a step (blocksize 64: 2 blocks; 16 bytes a thread), 32 rows a one-warp program;
    split-K doubled while it stays under the target count of programs, 16 slices and 2 steps a slice."""
    half = blocksize // 2
    nbk = max(1, 64 // half)
    steps = -(-(k // blocksize) // nbk)
    block_n = max(1, min(32, 2048 // (nbk * half)))
    want = min(_MAX_SPLIT_K, max(1, _TARGET_PROGRAMS // triton.cdiv(n, block_n)))
    split_k = 1
    while split_k * 2 <= want and steps // (split_k * 2) >= _MIN_STEPS_PER_SLICE:
        split_k *= 2
    return GemvConfig(block_n=block_n, nbk=nbk, num_warps=1, split_k=split_k)


# Rows of x the kernel takes: it decodes W once and multiplies each row with fp32 FMAs, so its time grows
# with M. On an H200 the seventh session's kernel beat dequantize + cuBLAS up to M = 4 (28672x8192: 0.20 ms vs
# 0.28) and lost at M = 8 (0.36-0.39 ms vs 0.28); the tensor-core kernel (mma.py) beats it from M = 2 (0.111 ms
# vs 0.133), so ops sends it M = 1 in bf16/fp16 on weights below gemv_tc.MIN_PARAMS
# and fp32 x up to MAX_M rows. (This kernel takes 0.205 ms at M = 3 in fp32 on 28672x8192, spilling 16 bytes a
# thread at 4 rows (benchmarks/sass.py); M = 5-8 were not timed with it.)
MAX_M = 4


def supported(k: int, blocksize: int) -> bool:
    """Whether the fused kernel handles rows of length k (whole blocks per row)."""
    return k % blocksize == 0


def gemv(
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
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_M) @ W[n, K]^T (+ bias) -> [M, n] in x's dtype."""
    m, k = x.shape
    assert 1 <= m <= MAX_M and supported(k, blocksize) and x.dtype in _X_KIND, (x.shape, x.dtype, blocksize)
    config = config or default_config(n, k, blocksize)
    # x as int32 words, each row starting on 16 bytes (the vector loads; CUDA allocations are 512-byte aligned)
    size = x.element_size()
    if x.stride(1) != 1 or (x.storage_offset() * size) % 16 or (m > 1 and (x.stride(0) * size) % 16):
        x = x.clone(memory_format=torch.contiguous_format)
    codes = data.reshape(-1)  # int32 words: 4 bytes, 8 codes (a row is blocksize / 8 >= 4 words)
    if codes.storage_offset() % 4:
        codes = codes.clone()
    qargs = (codes.view(torch.int32), absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize)
    return launch(
        _gemv_kernel, x.view(torch.int32), x.dtype, k, qargs, n, bias, config.block_n, config.split_k,
        config.num_warps, True, X_KIND=_X_KIND[x.dtype], BLOCK_M=triton.next_power_of_2(m), NBK=config.nbk,
        PREFETCH=config.prefetch, PLAIN_LOADS=interpreted() or tracing(),
    )  # fmt: skip
