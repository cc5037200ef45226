"""The fused (TorchInductor) CPU path gives the reference's bytes exactly."""

from __future__ import annotations

import pytest
import torch

import nf4
from nf4 import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler for TorchInductor, or NF4_NO_COMPILE")


@pytest.fixture
def eager(monkeypatch):
    """Quantize with the fused path switched off."""

    def run(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(cpu, "usable", lambda *a: False)
            return nf4.quantize(*args, **kwargs)

    return run


@pytest.mark.parametrize(
    ("dtype", "quant_type", "blocksize"),
    [(torch.bfloat16, "nf4", 64), (torch.float32, "fp4", 128), (torch.float16, "int4", 32)],
)
def test_fused_quantize_is_the_reference(eager, dtype, quant_type, blocksize):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = (torch.randn(cpu.MIN_ELEMENTS + 12345, generator=g) * 0.03).to(dtype)
    x[:blocksize] = 0  # an all-zero block
    x[5000:5010] = 1e-39 if dtype != torch.float16 else 1e-7  # subnormals (fp32/bf16) are flushed
    x[-7:] = -x[-7:]
    assert cpu.usable(x)
    ref = eager(x, quant_type, blocksize, double_quant=True)
    ours = nf4.quantize(x, quant_type, blocksize, double_quant=True)
    assert torch.equal(ours.data, ref.data)
    assert torch.equal(ours.absmax, ref.absmax) and torch.equal(ours.nested_absmax, ref.nested_absmax)
    assert ours.nested_offset == ref.nested_offset


def test_double_quant_of_a_few_thousand_absmax_is_compiled_and_is_the_reference(eager, monkeypatch):
    """A 576x1536 weight has 13,824 absmax values: their 8-bit codes are compiled too (from 4096 values)."""
    x = torch.randn(576, 1536, generator=torch.Generator().manual_seed(5))
    x[0, :64] = 0  # a zero absmax: the offset pushes it below the smallest code
    calls = []
    encode = cpu.encode_8bit
    monkeypatch.setattr(cpu, "encode_8bit", lambda y, dyn: calls.append(y.numel()) or encode(y, dyn))
    ours, ref = nf4.quantize(x), eager(x)
    assert calls == [x.numel() // 64]
    assert torch.equal(ours.absmax, ref.absmax) and torch.equal(ours.nested_absmax, ref.nested_absmax)
    assert ours.nested_offset == ref.nested_offset and torch.equal(ours.data, ref.data)


def test_fused_path_rejects_nan(eager):
    x = torch.randn(cpu.MIN_ELEMENTS)
    x[-1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        nf4.quantize(x)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_dequantize_is_the_reference(monkeypatch, out_dtype):
    x = torch.randn(2 * cpu.MIN_ELEMENTS) * 0.02
    x[:64] = 0
    x[100:110] = 1e-36  # products below FLT_MIN are flushed
    q = nf4.quantize(x, "fp4", 64, double_quant=True)
    assert cpu.usable(q.data)
    ours = nf4.dequantize(q, out_dtype)
    monkeypatch.setattr(cpu, "usable", lambda *a: False)
    assert torch.equal(ours, nf4.dequantize(q, out_dtype))
