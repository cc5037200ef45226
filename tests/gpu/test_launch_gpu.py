"""Eager launches through ``common.run``'s cache of compiled kernels (skipped without CUDA): every route of
``ops.matmul``, repeated calls, a misaligned bias, CUDA-graph capture after eager calls, and a launch hook."""

from __future__ import annotations

import pytest
import torch
import triton

from nf4 import ops
from nf4.kernels import common

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ops.HAS_TRITON, reason="needs CUDA and Triton")

# (rows of x, weight shape): the FMA decode kernel, gemv_tc (1, 2 and 4 rows), gemv_tcm (one and two row groups),
# mma, dequantize + cuBLAS
ROUTES = [(1, (4096, 4096)), (1, (14336, 4096)), (2, (14336, 4096)), (4, (4096, 4096)), (8, (4096, 4096)),
          (12, (14336, 4096)), (32, (1024, 4096)), (100, (1024, 4096))]  # fmt: skip


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize(("m", "shape"), ROUTES)
def test_repeated_calls_are_right_and_add_no_launches(m: int, shape: tuple[int, int]) -> None:
    n, k = shape
    q = ops.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    w = ops.dequantize(q, torch.float32).double()
    bias = torch.randn(n + 1, device="cuda", dtype=torch.bfloat16)
    for i in range(6):
        b = bias[:n] if i % 2 else bias[1:]  # 16-byte aligned, then 2 bytes off: two specializations
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        torch.full((1 << 26,), float("nan"), device="cuda")  # poison freed memory the outputs may reuse
        out = ops.matmul(x, q, b)
        assert _rel(out, x.double() @ w.T + b.double()) < 6e-3, i
        if i == 1:
            launches = len(common._LAUNCHES)
    assert len(common._LAUNCHES) == launches  # calls 2-5 found their kernels


def test_graph_captured_after_eager_calls() -> None:
    q = ops.quantize(torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16))
    w = ops.dequantize(q, torch.float32).double()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ops.matmul(x, q)  # compiled and cached eagerly; the capture launches from the cache
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.matmul(x, q)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(out, x.double() @ w.T) < 6e-3


@pytest.mark.skipif(not common._DIRECT, reason="Triton < 3.6: every launch goes through Triton")
def test_launch_hook_sees_every_launch() -> None:
    q = ops.quantize(torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    ops.matmul(x, q)
    names: list[str] = []
    chain = triton.knobs.runtime.launch_enter_hook
    triton.knobs.runtime.launch_enter_hook = lambda metadata: names.append(metadata.get()["name"])
    try:
        out = ops.matmul(x, q)
    finally:
        triton.knobs.runtime.launch_enter_hook = chain
    assert names and all("kernel" in name for name in names)
    assert _rel(out, x.double() @ ops.dequantize(q, torch.float32).double().T) < 6e-3
