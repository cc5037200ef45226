"""The compiled C dequantize gives the reference's values exactly, and a missing compiler only costs speed."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import nf4
from nf4 import cpu, native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler, or NF4_NO_COMPILE")


def _reference(monkeypatch: pytest.MonkeyPatch, q: nf4.QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setattr(native, "usable", lambda *a: False)
        m.setattr(cpu, "usable", lambda *a: False)
        return nf4.dequantize(q, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("quant_type", "blocksize", "n"), [("nf4", 64, 3 * 2**18 + 65), ("fp4", 32, 1001),
                                                            ("int4", 4096, 2**20), ("nf4", 128, 7)])  # fmt: skip
def test_native_dequantize_is_the_reference(monkeypatch, dtype, quant_type, blocksize, n):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(n, generator=g) * 0.02
    x[: min(n, blocksize)] = 0  # an all-zero block
    if n > 2 * blocksize:
        x[blocksize : 2 * blocksize] *= 1e-3  # fp16 subnormal outputs: rounded, not flushed
        x[2 * blocksize + 3] = 1e-36  # products below FLT_MIN are flushed to zero
    q = nf4.quantize(x, quant_type, blocksize, double_quant=n > 1000)
    assert native.usable(q.data, dtype)
    ours = nf4.dequantize(q, dtype)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert torch.equal(ours.view(torch.uint8), _reference(monkeypatch, q, dtype).view(torch.uint8))


def test_native_dequantize_is_the_same_on_any_thread_count(monkeypatch):
    q = nf4.quantize(torch.randn(1 << 20) * 0.1)
    one = nf4.dequantize(q)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert torch.equal(one, nf4.dequantize(q))


def test_a_failed_compile_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("NF4_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(native, "_compiler", lambda: "false")
    native.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="could not compile"):
            assert native.library() is None
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
        q = nf4.quantize(torch.randn(4096))
        assert torch.allclose(nf4.dequantize(q), _reference(monkeypatch, q, torch.float32))
    finally:
        native.library.cache_clear()


def test_compiles_into_the_cache_once(monkeypatch, tmp_path):
    monkeypatch.setenv("NF4_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
        native.library.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        native.library.cache_clear()


_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("quant_type", "blocksize", "shape", "rows", "dq"), [
    ("nf4", 64, (576, 1536), 1, True),     # the SIMD kernels, double quant
    ("fp4", 128, (300, 256), 16, False),   # fp32 absmax, the most rows
    ("int4", 32, (33, 4096), 5, True),
    ("nf4", 64, (7, 100), 3, True),        # K % blocksize != 0: the scalar path, blocks across rows
    ("nf4", 4096, (3, 4096), 2, False),
    ("nf4", 64, (39, 512), 11, True),      # AVX-512 tiles of 4 x 4: 2 whole x tiles and 3 rows, 9 W tiles and 3 rows
])  # fmt: skip
@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "avx2"])
def test_native_matmul_is_x_times_the_dequantized_weight(monkeypatch, dtype, quant_type, blocksize, shape, rows, dq,
                                                         avx512):  # fmt: skip
    """x @ W.T in fp32 with W = dequantize(q, fp32), then one rounding to x's dtype; the AVX-512 kernel (where the
    CPU has it) and the AVX2 one."""
    if not avx512:
        monkeypatch.setenv("NF4_NO_AVX512", "1")
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, : min(shape[1], blocksize)] = 0
    q = nf4.quantize(w, quant_type, blocksize, double_quant=dq)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    bias = torch.randn(shape[0], generator=g).to(dtype)
    assert native.matmul_usable(x, q)
    ours = native.matmul(x, q, bias)
    assert ours.dtype == dtype and ours.shape == (rows, shape[0])
    wq = nf4.dequantize(q, torch.float32).double()
    want = x.double() @ wq.T + bias.double()
    bound = _EPS[dtype] * want.abs() + 2.0**-22 * (x.double().abs() @ wq.abs().T + bias.double().abs())
    assert ((ours.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("rows", [4, 7])
def test_native_matmul_is_the_same_on_any_thread_count(monkeypatch, rows):
    """Threads split W's rows anywhere, also inside the AVX-512 kernel's tiles of 4: a row's sum is the same."""
    q = nf4.quantize(torch.randn(1024, 512) * 0.1)
    x = torch.randn(rows, 512)
    one = native.matmul(x, q)  # one thread (under MATMUL_PARAMS_PER_THREAD)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(native, "MATMUL_PARAMS_PER_THREAD", 1 << 16)  # 8 threads' worth, 7 allowed
    assert torch.equal(one, native.matmul(x, q))


def test_ops_matmul_takes_the_native_kernel_for_a_few_rows_only(monkeypatch):
    q = nf4.quantize(torch.randn(256, 128) * 0.1)
    calls = []
    kernel = native.matmul
    monkeypatch.setattr(native, "matmul", lambda x, q, b=None: calls.append(x.shape) or kernel(x, q, b))
    for rows in (1, native.MATMUL_MAX_M, native.MATMUL_MAX_M + 1):
        x = torch.randn(2, rows, 128, requires_grad=True) if rows == 1 else torch.randn(rows, 128, requires_grad=True)
        y = nf4.ops.matmul(x, q)
        want = x.detach() @ nf4.dequantize(q).T
        torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-5)
        y.sum().backward()  # backward dequantizes: the same gradient on every path
        torch.testing.assert_close(x.grad, nf4.dequantize(q).sum(0).expand_as(x), rtol=1e-5, atol=1e-5)
    assert calls == [(2, 1, 128), (native.MATMUL_MAX_M, 128)]


def test_native_matmul_keeps_a_weights_arguments_and_sees_in_place_updates():
    q = nf4.quantize(torch.randn(96, 256) * 0.1)
    x = torch.randn(3, 256)
    first = native.matmul(x, q)
    assert "_native_args" in q.__dict__  # q's own tensors: kept for the next call
    assert torch.equal(native.matmul(x, q), first)
    q.data.copy_(torch.randint(0, 256, q.data.shape, dtype=torch.uint8))  # new codes in the same tensor
    got = native.matmul(x, q)
    assert not torch.equal(got, first)
    torch.testing.assert_close(got, x @ nf4.dequantize(q).T, rtol=1e-5, atol=1e-5)


def test_native_matmul_of_a_deep_copy_reads_the_copy():
    q = nf4.quantize(torch.randn(64, 128) * 0.1)
    x = torch.randn(2, 128)
    native.matmul(x, q)  # q now carries its arguments, which a deep copy copies too
    twin = copy.deepcopy(q)
    want = native.matmul(x, twin)
    q.data.zero_()  # the original changes: the copy must not be reading it
    assert torch.equal(native.matmul(x, twin), want)
    assert not torch.equal(native.matmul(x, q), want)


def test_native_matmul_does_not_keep_copies():
    q = nf4.quantize(torch.randn(64, 128) * 0.1)
    q64 = dataclasses.replace(q, quant_map=q.quant_map.double())  # converted (a copy) at each call
    x = torch.randn(2, 128)
    torch.testing.assert_close(native.matmul(x, q64), native.matmul(x, q), rtol=0, atol=0)
    assert "_native_args" not in q64.__dict__
