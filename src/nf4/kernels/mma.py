"""Fused dequantize-matmul on tensor cores for small batches: out = x @ W^T (+ bias), W read once as 4-bit codes.

The FMA kernel (gemv.py) spends ~8 instructions a weight for each row of x, so its time grows with M; from M = 2
this kernel is faster. A program decodes a [BLOCK_N, blocksize] tile of W to x's dtype in registers and hands it
to ``tl.dot`` against x's [16-64, blocksize] tile (rows past M are zeros): the multiply-adds run on tensor cores,
so the time is flat in M up to 16 rows and grows slowly to 64, and W's bytes are streamed once. Split-K slices
and their deterministic sum are as in gemv.py (common.launch).

What the H200 sweeps taught (docs/BENCHMARKS_GPU.md):
- x's tile must feed the dot straight from its load (a plain 2-D tile), so that Triton pipelines it with the
  codes; loaded as element pairs and split, every step waited for it (0.174 ms against 0.109 on 28672x8192);
- the levels come from registers: the 16 levels' high and low bytes sit in 8 registers and ``prmt`` (byte
  permute) picks 4 of them per instruction (_levels_prmt, inline PTX, ~3 instructions a weight): 0.175 ms
  against 0.211 for a shared-memory gather (x still read as pairs then);
- the levels are x's dtype and each block's product is scaled by its absmax in fp32 afterwards, so a weight is
  rounded once, to within x's rounding of ``level * absmax`` (dequantize rounds that product itself; the results
  agree to the output's rounding). dequantize's exact values need fp32 levels from a gather and the scale before
  the dot: 0.211 ms against 0.175 for this (28672x8192, both with x still read as pairs);
- the absmax bytes (1-byte loads, which Triton's pipelining leaves synchronous) of the next block are loaded a
  block ahead: 6-7% faster on the 70B shapes at M = 4 and 16, 3% on the 8B ones (0.1054 against 0.1130 ms);
- profiled (ncu, 28672x8192, M = 16): 4 programs an SM (registers and shared memory), ALU pipe 68% busy (the
  prmt decode), DRAM 26%; the same time on an H100 as on an H200, so not bound by bandwidth. Shuffle lookups,
  levels scaled before the dot (async wgmma) and a 256-entry byte-pair table were all slower.

Needs K % blocksize == 0 and x in bf16 or fp16; other inputs take gemv.py or dequantize + cuBLAS (gemm.py).
ops sends it 17-64 rows, and 2-16 where gemv_tcm.py does not take them (blocksize 32):
gemv_tcm, gemv_tc's byte-pair table with rows of x as the mma's columns, is 4-33% faster at M = 2-8 and about as
fast at 16. The same table in this kernel (one copy per lane, looked up by ``prmt``) was 12-25% slower than the
register decode (fourteenth session).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from nf4.kernels.common import absmax_decode, absmax_raw, launch, round_to, store_tile


# The 16 levels in x's dtype (bf16/fp16 bits) as 8 words of bytes, the table of _levels_prmt:
# words 0-3 hold the high bytes of levels 0-3, 4-7, 8-11, 12-15; words 4-7 the low bytes.
@triton.jit
def _byte_tables(table_x):
    i = tl.arange(0, 16)
    bits = table_x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    high = ((bits >> 8) & 0xFF) << (8 * (i % 4))
    low = (bits & 0xFF) << (8 * (i % 4))
    h0 = tl.sum(tl.where(i // 4 == 0, high, 0))
    h1 = tl.sum(tl.where(i // 4 == 1, high, 0))
    h2 = tl.sum(tl.where(i // 4 == 2, high, 0))
    h3 = tl.sum(tl.where(i // 4 == 3, high, 0))
    l0 = tl.sum(tl.where(i // 4 == 0, low, 0))
    l1 = tl.sum(tl.where(i // 4 == 1, low, 0))
    l2 = tl.sum(tl.where(i // 4 == 2, low, 0))
    l3 = tl.sum(tl.where(i // 4 == 3, low, 0))
    return h0, h1, h2, h3, l0, l1, l2, l3


# codes (uint8, 4 consecutive bytes a thread) -> (levels of the high nibbles, of the low nibbles) as 16-bit
# patterns typed bf16 (the caller bitcasts them for fp16 x). Per half word of codes (4 nibbles in bits 0-15 of w):
# prmt picks byte (nibble & 7) of a register pair ($5/$9 ...: the byte tables; each 32-bit operand of a pack-4 asm
# comes as 4 registers), so each byte of a level is looked up twice (codes 0-7 and 8-15) and a lop3 keeps the one
# that bit 3 of the nibble names (mask m: 0xFF where it is set); two more prmts put the levels' bytes together.
# The string is one literal, not a module constant: Inductor copies the kernel's source, not its globals.
@triton.jit
def _levels_prmt(codes, h0, h1, h2, h3, l0, l1, l2, l3):
    return tl.inline_asm_elementwise(
        "{ .reg .b32 w, k, sel, m, ha, hb, la, lb; mov.b32 k, 0xFF00; mov.b32 w, $4; "
        "and.b32 sel, w, 0x7777; prmt.b32 ha, $5, $9, sel; prmt.b32 hb, $13, $17, sel; "
        "prmt.b32 la, $21, $25, sel; prmt.b32 lb, $29, $33, sel; shr.b32 m, w, 3; and.b32 m, m, 0x1111; "
        "prmt.b32 m, k, k, m; lop3.b32 ha, ha, hb, m, 0xD8; lop3.b32 la, la, lb, m, 0xD8; "
        "prmt.b32 $0, la, ha, 0x7351; prmt.b32 $2, la, ha, 0x6240; "
        "shr.b32 w, $4, 16; "
        "and.b32 sel, w, 0x7777; prmt.b32 ha, $5, $9, sel; prmt.b32 hb, $13, $17, sel; "
        "prmt.b32 la, $21, $25, sel; prmt.b32 lb, $29, $33, sel; shr.b32 m, w, 3; and.b32 m, m, 0x1111; "
        "prmt.b32 m, k, k, m; lop3.b32 ha, ha, hb, m, 0xD8; lop3.b32 la, la, lb, m, 0xD8; "
        "prmt.b32 $1, la, ha, 0x7351; prmt.b32 $3, la, ha, 0x6240; "
        "}",
        "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
        [codes, h0, h1, h2, h3, l0, l1, l2, l3],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
    )


# Step s of a program covers blocks [s*NBK, (s+1)*NBK) of its rows; for block b (byte j holds the codes of
# elements 2j, high nibble, and 2j+1, low nibble):
#   w[n, 2j], w[n, 2j + 1] = level[code[n, j] >> 4], level[code[n, j] & 15]       (x's dtype)
#   acc[n, m] += absmax[n, b] * sum_k w[n, k] * x[m, b*blocksize + k]             (tensor cores; scaled in fp32)
# x's tile is loaded as a plain 2-D tile that feeds the dot directly, so Triton pipelines its load with the codes'
# (loaded as element pairs and split, it was waited for every step: 0.174 ms against 0.109 on 28672x8192).
@triton.jit
def _mma_kernel(
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NBK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SUM_IN_KERNEL: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    dtype = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(rows, N - 1)  # rows past N repeat the last one; their results are not stored
    blocks_per_row = K // BLOCKSIZE
    steps = tl.cdiv(blocks_per_row, NBK)
    per_split = tl.cdiv(steps, SPLIT_K)
    s0 = tl.program_id(1) * per_split
    s1 = tl.minimum(s0 + per_split, steps)
    mrow = tl.arange(0, BLOCK_M)
    code_ptr = data_ptr + rn.to(tl.int64)[:, None] * (blocks_per_row * HB) + tl.arange(0, HB)[None, :]
    x_tile = x_ptr + mrow[:, None] * stride_x + tl.arange(0, BLOCKSIZE)[None, :]
    table = round_to(tl.load(quant_map_ptr + tl.arange(0, 16)), dtype, INTERPRETED)
    h0, h1, h2, h3, l0, l1, l2, l3 = _byte_tables(table)
    zero = tl.zeros((BLOCK_N, HB), tl.int32)
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    row_blocks = rn * blocks_per_row
    a_code, a_scale = absmax_raw(
        absmax_ptr, nested_absmax_ptr, row_blocks + s0 * NBK, rn * 0 + s0 * NBK < blocks_per_row, DOUBLE_QUANT
    )
    for s in range(s0, s1):
        for i in tl.static_range(NBK):
            blk = s * NBK + i  # past the row's last block (a partial last step): codes, absmax and x read as 0
            codes = tl.load(code_ptr + blk * HB, mask=zero + blk < blocks_per_row, other=0,
                            eviction_policy="evict_first")  # fmt: skip
            # this block's absmax bytes were loaded a block ahead; the next block's go out now (Triton's pipelining
            # takes the codes and x, not these 1-byte loads, which were waited for every block)
            code, scale = a_code, a_scale
            a_code, a_scale = absmax_raw(
                absmax_ptr, nested_absmax_ptr, row_blocks + blk + 1, rn * 0 + blk + 1 < blocks_per_row, DOUBLE_QUANT
            )
            absmax = absmax_decode(code, scale, nested_quant_map_ptr, nested_offset_ptr, DOUBLE_QUANT, INTERPRETED)
            absmax = absmax[:, None]
            if INTERPRETED:  # no inline PTX on CPU: the same levels by a table gather
                flat = tl.reshape(codes.to(tl.int32), (BLOCK_N * HB,))
                hi = tl.reshape(tl.gather(table, flat >> 4, 0), (BLOCK_N, HB))
                lo = tl.reshape(tl.gather(table, flat & 15, 0), (BLOCK_N, HB))
            else:
                hi, lo = _levels_prmt(codes, h0, h1, h2, h3, l0, l1, l2, l3)
                hi, lo = hi.to(dtype, bitcast=True), lo.to(dtype, bitcast=True)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCKSIZE))  # byte j -> elements 2j, 2j + 1
            xmask = (mrow < M)[:, None] & (mrow * 0 + blk < blocks_per_row)[:, None]
            xt = tl.load(x_tile + blk * BLOCKSIZE, mask=xmask, other=0.0)  # straight into the dot: pipelined
            if INTERPRETED:  # the interpreter's dot misreads bf16; fp32 products of these values are exact
                part = tl.dot(w.to(tl.float32), tl.trans(xt.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(w, tl.trans(xt))
            acc += part * absmax
    store_tile(
        acc, rows, mrow, M, N, bias_ptr, out_ptr, partial_ptr, counter_ptr, HAS_BIAS, SPLIT_K, SUM_IN_KERNEL,
        INTERPRETED,
    )  # fmt: skip


@dataclass(frozen=True)
class MmaConfig:
    """BLOCK_N rows of W per program, NBK blocks of K per step, K cut into split_k slices."""

    block_n: int = 128
    nbk: int = 1
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


# Rows x slices the launch aims for, and the fewest blocks a slice keeps (H200 sweeps, docs/BENCHMARKS.md): the
# split-K this gives on the five Llama shapes (N x K = 28672x8192 / 8192x28672 / 14336x4096 / 4096x14336 /
# 4096x4096: 4 / 16 / 8 / 16 / 8) measured as fast as or faster than half or twice that; two blocks a step,
# 8 warps or other pipeline depths were slower. Where 128-row tiles would make fewer than _SMALL_LAUNCH programs,
# 64-row tiles keep more SMs busy (M = 16: 4096x4096 0.0147 against 0.0153 ms, 1024x4096 0.0091-0.0098 against
# 0.0123; 4096x14336, 512 programs, was 6% slower with them; 8B decode step at batch 16 5.03 -> 4.80 ms),
# docs/BENCHMARKS_GPU.md, "Ninth session".
_TARGET_ROW_SLICES = 1024 * 128
_MIN_BLOCKS_PER_SLICE = 8
_SMALL_LAUNCH = 512


def default_config(n: int, k: int, blocksize: int, m: int) -> MmaConfig:
    """128-row tiles up to 16 rows of x (64-row tiles for 32 and 64: measured 2-5% faster, and the fp32
    accumulator stays at 32 registers a thread; and for launches too small to fill the GPU), one block a step,
    split-K doubled up to the target."""
    blocks = k // blocksize
    want = max(1, _TARGET_ROW_SLICES // n)
    split_k = 1
    while split_k * 2 <= want and blocks // (split_k * 2) >= _MIN_BLOCKS_PER_SLICE:
        split_k *= 2
    large = m <= 16 and triton.cdiv(n, 128) * split_k >= _SMALL_LAUNCH
    return MmaConfig(block_n=128 if large else 64, split_k=split_k)


# Rows of x the kernel takes (ops sends it those of MIN_M <= M <= MAX_M that gemv_tcm.py does not take). x's
# tile is M rounded up to 16, 32 or 64 rows; the time is flat in M up to 16 and grows slowly to 64 (28672x8192:
# 0.111 / 0.128 / 0.159 ms at M = 16 / 32 / 64, against 0.278-0.281 for dequantize + cuBLAS). At M = 128 it lost
# to that on 14336x4096 (0.100 vs 0.080 ms). Below MIN_M the FMA kernel (gemv.py) is faster.
MIN_M = 2
MAX_M = 64


def supported(x: torch.Tensor, k: int, blocksize: int) -> bool:
    """Whether the kernel takes x (bf16 or fp16: the levels are x's dtype) against rows of k = whole blocks."""
    return x.dtype in (torch.bfloat16, torch.float16) and k % blocksize == 0 and blocksize >= 32


def mma(
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
    config: MmaConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16, 1 <= M <= MAX_M) @ W[n, K]^T (+ bias) -> [M, n] in x's dtype."""
    m, k = x.shape
    assert 1 <= m <= MAX_M and supported(x, k, blocksize), (x.shape, x.dtype, blocksize)
    config = config or default_config(n, k, blocksize, m)
    if x.stride(1) != 1:
        x = x.contiguous()
    qargs = (data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize)
    return launch(
        _mma_kernel, x, x.dtype, k, qargs, n, bias, config.block_n, config.split_k, config.num_warps, False,
        BLOCK_M=max(16, triton.next_power_of_2(m)), NBK=config.nbk, num_stages=config.num_stages,
    )  # fmt: skip
