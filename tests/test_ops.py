"""nf4.ops on CPU: the torch.library ops equal the reference, differentiate in x and compile without breaks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import nf4
from nf4 import ops
from nf4.nn import LinearNF4


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 128), (9, 41), (3, 5, 7)])
def test_quantize_dequantize_equal_reference(double_quant: bool, shape: tuple) -> None:
    x = torch.randn(shape, dtype=torch.bfloat16)
    q = ops.quantize(x, "nf4", 32, double_quant)
    ref = nf4.quantize(x, "nf4", 32, double_quant)
    assert torch.equal(q.data, ref.data) and torch.equal(q.absmax, ref.absmax)
    assert q.nested_offset == ref.nested_offset
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(ops.dequantize(q, dtype), nf4.dequantize(ref, dtype))


def test_quantize_rejects_nan_and_bad_options() -> None:
    x = torch.randn(128)
    x[3] = float("inf")
    with pytest.raises(nf4.FormatError, match="NaN or Inf"):
        ops.quantize(x)
    with pytest.raises(nf4.FormatError, match="blocksize"):
        ops.quantize(torch.randn(128), blocksize=48)


def test_matmul_forward_and_input_gradient() -> None:
    q = nf4.quantize(torch.randn(24, 64))
    bias = torch.randn(24)
    x = torch.randn(2, 3, 64, requires_grad=True)
    out = ops.matmul(x, q, bias)
    w = nf4.dequantize(q, torch.float32)
    # 6 rows: the CPU's fused kernel (nf4.native.matmul), whose fp32 sums run in another order than x @ w.T's
    want = x @ w.T + bias
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6 * want.abs().max().item())
    out.pow(2).sum().backward()
    x_ref = x.detach().requires_grad_()
    (x_ref @ w.T + bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6 * x_ref.grad.abs().max().item())


def test_matmul_rejects_mismatched_shapes() -> None:
    q = nf4.quantize(torch.randn(24, 64))
    with pytest.raises(ValueError, match="expects 64"):
        ops.matmul(torch.randn(2, 63), q)
    with pytest.raises(ValueError, match="bias"):
        ops.matmul(torch.randn(2, 64), q, torch.randn(5))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q1 = nf4.quantize(torch.randn(32, 64))
        self.q2 = nf4.quantize(torch.randn(16, 32), double_quant=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.matmul(torch.relu(ops.matmul(x, self.q1)), self.q2) + ops.dequantize(self.q2).sum()


def test_compile_fullgraph_cpu() -> None:
    model = _Tiny()
    x = torch.randn(4, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # eager: the fused CPU kernel (4 rows); compiled: the op's dequantize + linear. Same values, other sum order.
    want = model(x)
    torch.testing.assert_close(compiled(x), want, rtol=0, atol=1e-6 * want.abs().max().item())


_NO_TRITON = """
import sys
sys.modules["triton"] = None  # as if it were not installed: `import triton` fails, find_spec says None
import torch
import nf4
from nf4 import ops
from nf4.nn import LinearNF4

assert not ops.HAS_TRITON and "nf4.kernels" not in sys.modules
torch.manual_seed(0)
w, x = torch.randn(48, 128, dtype=torch.bfloat16), torch.randn(5, 128)
q = ops.quantize(w)
layer = LinearNF4(128, 32)
compiled = torch.compile(lambda x: ops.matmul(x, q), fullgraph=True, backend="aot_eager")
torch.save({"data": q.data, "absmax": q.absmax, "deq": ops.dequantize(q), "mm": ops.matmul(x, q),
            "compiled": compiled(x), "layer": layer(x), "state": layer.state_dict()}, sys.argv[1])
"""


def test_without_triton_the_cpu_paths_give_the_same_results(tmp_path) -> None:
    # the "no Triton -> the CPU path, same results, no crash at import", in a process where triton cannot
    # be imported: the ops, their compiled form (custom_op with fake implementations) and LinearNF4
    out = tmp_path / "no_triton.pt"
    subprocess.run([sys.executable, "-c", _NO_TRITON, str(out)], check=True, timeout=600)
    got = torch.load(out)
    torch.manual_seed(0)
    w, x = torch.randn(48, 128, dtype=torch.bfloat16), torch.randn(5, 128)
    q = ops.quantize(w)
    layer = LinearNF4(128, 32)
    assert torch.equal(got["data"], q.data) and torch.equal(got["absmax"], q.absmax)
    assert torch.equal(got["deq"], ops.dequantize(q)) and torch.equal(got["mm"], ops.matmul(x, q))
    torch.testing.assert_close(got["compiled"], got["mm"], rtol=0, atol=1e-6 * got["mm"].abs().max().item())
    assert torch.equal(got["layer"], layer(x))
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in got["state"].items())
