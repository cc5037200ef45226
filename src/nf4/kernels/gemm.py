"""Large-M matmul (prefill, training): dequantize W into a bf16/fp16 buffer at copy speed, then cuBLAS.

At M >= 32 the product is no longer bound by streaming W; cuBLAS's tensor-core GEMM is the fastest
multiply available, and the dequantize pass adds 2.5 bytes/param (0.14 ms for a 28672x8192 weight on an
H200), small against the GEMM itself at prefill sizes. The fused kernel (gemv.py) with wide tiles is the
alternative; benchmarks/kernels.py measures both.
"""

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
