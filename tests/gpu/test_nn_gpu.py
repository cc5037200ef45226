"""Fused projections on a GPU (skipped without CUDA): an 8B Llama's q/k/v and gate/up as one matmul each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nf4
from nf4 import ops
from nf4.nn import FusedLinearNF4, FusedPart, LinearNF4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ops.HAS_TRITON, reason="needs CUDA and Triton")

GROUPS = {"qkv": [(4096, 4096), (1024, 4096), (1024, 4096)], "gate_up": [(14336, 4096), (14336, 4096)]}


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("m", [1, 4, 16, 40])
def test_fused_projections_equal_their_layers_eager_and_graphed(group: str, m: int) -> None:
    layers = [LinearNF4.from_linear(nn.Linear(k, n, bias=False, device="cuda")) for n, k in GROUPS[group]]
    fused = FusedLinearNF4(layers)
    cpu = nf4.concat([layer.qweight.to("cpu") for layer in layers])
    q = fused.qweight
    assert torch.equal(q.data.cpu(), cpu.data) and torch.equal(q.absmax.cpu(), cpu.absmax)  # same bytes anywhere
    assert q.nested_offset == cpu.nested_offset and torch.equal(q.nested_absmax.cpu(), cpu.nested_absmax)
    parts = [FusedPart(fused, i) for i in range(len(layers))]
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = (x.double() @ ops.dequantize(q, torch.bfloat16).double().T).split(fused.sizes, dim=-1)
    unfused = [layer(x).double() for layer in layers]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = [part(x) for part in parts]
    for run in ("eager", "graph"):
        torch.cuda.synchronize()
        if run == "graph":
            graph.replay()
            outs = graphed
        else:
            outs = [part(x) for part in parts]
        for out, want, apart in zip(outs, ref, unfused, strict=True):
            assert out.shape == (m, want.shape[1]) and out.dtype == torch.bfloat16
            assert ((out.double() - want).norm() / want.norm()).item() < 6e-3  # the kernels' own bound
            # against the layers as they were: + the absmax re-encoded once (half an 8-bit step)
            assert ((out.double() - apart).norm() / apart.norm()).item() < 1e-2
    assert fused._input is None
