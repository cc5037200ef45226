"""Matmul for M > mma.MAX_M (prefill, training, batches), fp32 x over 4 rows and rows of partial blocks:
dequantize W into a bf16/fp16/fp32 buffer, then cuBLAS.

At large M cuBLAS's tensor-core GEMM is the fastest multiply available, and the dequantize pass adds 2.5
bytes/param (~0.15 ms for a 28672x8192 weight on an H200), small against the GEMM at prefill sizes (1.39 ms at
M = 2048). Up to M = 64 the fused kernels stream only the codes (0.111-0.159 ms against 0.28 for this path on
that weight). docs/BENCHMARKS.md has the paths at every M."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nf4.kernels.dequantize import dequantize


def gemm(
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
) -> torch.Tensor:
    """x [M, K] @ W[n, K]^T (+ bias) -> [M, n] in x's dtype; W lives only in a temporary of x's dtype."""
    k = x.shape[-1]
    w = dequantize(
        data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, n * k, x.dtype
    ).view(n, k)
    return F.linear(x, w, bias)
