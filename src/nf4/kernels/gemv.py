"""Fused dequantize-matmul for small M (decode): out = x @ W^T (+ bias), W read once as 4-bit codes.

At M <= 16 the product is bound by streaming W: 0.5 byte/param (+ absmax) instead of bf16's 2, so the
ceiling is ~3.9x bf16's speed. Each program owns BLOCK_N rows of W and walks K; it decodes a tile in
registers and never writes W out. W is the left operand (swap-AB: out^T = W x^T), so a tensor-core tile
needs 16 rows of x at most and M = 1 uses plain fp32 FMAs.

Needs K % blocksize == 0 (a row is whole blocks, rows start on a byte); other shapes take the
dequantize + cuBLAS path (gemm.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from nf4.kernels.common import interpreted, load_absmax, round_to


# Tile: BLOCK_N rows of W x KB blocks of BS elements, held as codes [BLOCK_N, KB, BS/2] (byte j -> k = 2j, 2j+1).
#   w_hi[n, b, j] = quant_map[code >> 4] * absmax  multiplies x[m, k0 + b*BS + 2j]
#   w_lo[n, b, j] = quant_map[code & 15] * absmax  multiplies x[m, k0 + b*BS + 2j + 1]
#   USE_DOT:  acc[n, m] += w_hi @ x_even^T + w_lo @ x_odd^T   (tensor cores, W cast to x's dtype as dequantize does)
#   else:     acc[n, b, j] += w_hi * x_even + w_lo * x_odd      (M = 1, fp32 FMAs, reduced once at the end)
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
    M,
    N,
    K,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KB: tl.constexpr,
    USE_DOT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = rn < N
    rn64 = tl.where(n_mask, rn, 0).to(tl.int64)
    kb = tl.arange(0, KB)
    j = tl.arange(0, HB)
    blocks_per_row = K // BLOCKSIZE
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, KB, HB), tl.float32)
    for b0 in range(0, blocks_per_row, KB):
        blk = b0 + kb  # block index along the row, [KB]
        b_mask = n_mask[:, None] & (blk < blocks_per_row)[None, :]  # [BLOCK_N, KB]
        flat_blk = rn64[:, None] * blocks_per_row + blk[None, :]
        byte = flat_blk[:, :, None] * HB + j[None, None, :]
        code = tl.load(data_ptr + byte, mask=b_mask[:, :, None], other=0).to(tl.int32)
        absmax = load_absmax(
            absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, flat_blk, b_mask,
            DOUBLE_QUANT, INTERPRETED,
        )[:, :, None]  # fmt: skip
        w_hi = tl.load(quant_map_ptr + (code >> 4)) * absmax
        w_lo = tl.load(quant_map_ptr + (code & 15)) * absmax
        k_even = blk[:, None] * BLOCKSIZE + 2 * j[None, :]  # [KB, HB]
        k_mask = (blk < blocks_per_row)[:, None]
        if USE_DOT:
            x_even_ptr = x_ptr + rm[None, None, :] * stride_xm + k_even[:, :, None]  # [KB, HB, BLOCK_M]
            x_mask = k_mask[:, :, None] & (rm < M)[None, None, :]
            x_even = tl.reshape(tl.load(x_even_ptr, mask=x_mask, other=0.0), (KB * HB, BLOCK_M))
            x_odd = tl.reshape(tl.load(x_even_ptr + 1, mask=x_mask, other=0.0), (KB * HB, BLOCK_M))
            dtype: tl.constexpr = x_ptr.dtype.element_ty
            w_hi = round_to(tl.reshape(w_hi, (BLOCK_N, KB * HB)), dtype, INTERPRETED)
            w_lo = round_to(tl.reshape(w_lo, (BLOCK_N, KB * HB)), dtype, INTERPRETED)
            if INTERPRETED:  # numpy's matmul has no bf16: multiply the (exactly widened) values in fp32
                w_hi, w_lo = w_hi.to(tl.float32), w_lo.to(tl.float32)
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            precision: tl.constexpr = "ieee" if dtype == tl.float32 else "tf32"
            acc = tl.dot(w_hi, x_even, acc, input_precision=precision)
            acc = tl.dot(w_lo, x_odd, acc, input_precision=precision)
        else:
            x_even = tl.load(x_ptr + k_even, mask=k_mask, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + k_even + 1, mask=k_mask, other=0.0).to(tl.float32)
            acc += w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :]
    if USE_DOT:
        result = acc
    else:
        result = tl.sum(tl.sum(acc, axis=2), axis=1)[:, None]  # [BLOCK_N, 1]
    if HAS_BIAS:
        result += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + rm[None, :] * stride_om + rn[:, None]
    tl.store(out, round_to(result, out_ptr.dtype.element_ty, INTERPRETED), mask=n_mask[:, None] & (rm < M)[None, :])


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape and launch width: BLOCK_N rows of W per program, KB blocks of K per step."""

    block_n: int
    kb: int
    num_warps: int
    num_stages: int
    block_m: int = 16


def default_config(m: int, n: int, blocksize: int) -> GemvConfig:
    """Per-program bytes of W in flight ~2-8 KiB; at least ~2 programs per SM on 8B-sized N."""
    kb = max(1, 512 // blocksize)
    if m == 1:
        return GemvConfig(block_n=16 if n <= 8192 else 32, kb=kb, num_warps=4, num_stages=3)
    return GemvConfig(block_n=32, kb=kb, num_warps=4, num_stages=2)


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
    """x [M, K] (row stride free, unit column stride) @ W[n, K]^T (+ bias) -> [M, n] in x's dtype."""
    m, k = x.shape
    assert supported(k, blocksize) and x.stride(1) == 1, (k, blocksize, x.stride())
    config = config or default_config(m, n, blocksize)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    use_dot = m > 1
    block_m = config.block_m if use_dot else 1
    double_quant = nested_absmax is not None
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
    wrap_triton(_gemv_kernel)[grid](
        x,
        data,
        absmax,
        quant_map,
        nested_absmax if double_quant else absmax,
        nested_quant_map if double_quant else quant_map,
        nested_offset if double_quant else absmax,
        bias if bias is not None else out,
        out,
        m,
        n,
        k,
        x.stride(0),
        out.stride(0),
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=config.block_n,
        KB=config.kb,
        USE_DOT=use_dot,
        INTERPRETED=interpreted(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
