"""The Triton kernels at real sizes on a GPU (skipped without CUDA): fresh random inputs, poisoned outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import nf4
from nf4 import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ops.HAS_TRITON, reason="needs CUDA and Triton")


def _qargs(q: nf4.QuantizedTensor) -> tuple:
    """The kernels' leading arguments for q, its double-quant offset (if any) as a device tensor."""
    offset = None if q.nested_offset is None else torch.tensor(q.nested_offset, dtype=torch.float32, device="cuda")
    return (q.data, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, offset, q.blocksize)


def _poison() -> None:
    """Fill freed cached memory with NaN, so that an output the kernel fails to write shows up."""
    junk = torch.full((1 << 28,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (1000, 333), (4097,), (3, 5, 7)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_dequantize_equal_reference(shape: tuple, quant_type: str, dtype: torch.dtype) -> None:
    x = torch.randn(shape, device="cuda", dtype=dtype) * torch.rand(1).item() * 10
    x.view(-1)[:64] = 0  # an all-zero block
    for blocksize in (64, 256):
        _poison()
        ours = ops.quantize(x, quant_type, blocksize)
        ref = nf4.quantize(x, quant_type, blocksize)
        assert torch.equal(ours.data, ref.data) and torch.equal(ours.absmax, ref.absmax)
        assert torch.equal(ours.nested_absmax, ref.nested_absmax) and ours.nested_offset == ref.nested_offset
        for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
            _poison()
            assert torch.equal(ops.dequantize(ours, out_dtype), nf4.dequantize(ref, out_dtype))


@pytest.mark.parametrize("shape", [(4096, 4096), (8192, 4224)])  # under and over dequantize.SMALL_NUMEL
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bits_equal_reference(shape: tuple, quant_type: str) -> None:
    """Bit for bit (a flushed product is +0, as in the reference), with blocks of tiny normals whose products
    flush to zero, every output dtype and blocksize, into a fresh tensor and into a view whose words straddle."""
    from nf4.kernels import dequantize as kdequantize

    x = torch.randn(shape, device="cuda") * 3
    x.view(-1)[: 4 * 256] *= 1e-38 / 3
    for blocksize in (32, 64, 256):
        for double_quant in (False, True):
            q = ops.quantize(x, quant_type, blocksize, double_quant)
            for dtype, bits in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16),
                                (torch.float32, torch.int32)):  # fmt: skip
                ref = nf4.dequantize(q, dtype).view(-1).view(bits)
                _poison()
                assert torch.equal(ops.dequantize(q, dtype).view(-1).view(bits), ref)
                out = torch.full((q.numel() + 1,), float("nan"), dtype=dtype, device="cuda")[1:]
                kdequantize.dequantize(*_qargs(q), q.numel(), dtype, out=out)
                assert torch.equal(out.view(bits), ref)


def test_double_quant_sums_in_graph_replays_and_on_two_streams() -> None:
    """The 4-bit pass adds the absmax sums into buffers of the stream it runs on, which the double-quant kernel
    zeroes: replays of a captured quantize, and quantizes running on two streams at once, each give the exact
    offset of their own weight."""
    from nf4.kernels import quantize as kquantize

    w = torch.empty(8192, 4096, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        w.normal_()
        kquantize.quantize(w, "nf4", 64, double_quant=True)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            data, codes, nested_absmax, offset = kquantize.quantize(w, "nf4", 64, double_quant=True)
    torch.cuda.current_stream().wait_stream(stream)
    for scale in (1.0, 30.0, 0.01):
        w.copy_(torch.randn_like(w) * scale)
        graph.replay()
        ref = nf4.quantize(w)
        assert torch.equal(data.view(-1), ref.data.view(-1)) and torch.equal(codes, ref.absmax)
        assert torch.equal(nested_absmax, ref.nested_absmax) and offset.item() == ref.nested_offset
    ws = [torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * s for s in (1.0, 7.0)]
    streams = [torch.cuda.Stream() for _ in ws]
    outs = []
    for _ in range(3):
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        for wi, s in zip(ws, streams, strict=True):
            with torch.cuda.stream(s):  # no host sync between the launches (ops.quantize reads the offset)
                outs.append(kquantize.quantize(wi, "nf4", 64, double_quant=True))
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    refs = [nf4.quantize(wi) for wi in ws]
    for i, (_, codes, _, offset) in enumerate(outs):
        assert torch.equal(codes, refs[i % 2].absmax) and offset.item() == refs[i % 2].nested_offset


def test_quantize_equals_bitsandbytes_cuda() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    q = ops.quantize(w)
    data, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
    assert torch.equal(q.data.view(-1), data.view(-1))
    # bitsandbytes' mean of absmax may differ by an ulp (its fp32 reduction; ours is an exact float64 sum),
    # and the nested codes then with it: compare them only where the offsets agree.
    if q.nested_offset == state.offset.item():
        assert torch.equal(q.absmax, state.absmax) and torch.equal(q.nested_absmax, state.state2.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "int4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_is_exact_at_thresholds_and_bucket_edges(quant_type: str, dtype: torch.dtype) -> None:
    # values within 3 ulps of every threshold and of the encoder's bucket edges (and 2**-7 below them, where the
    # rounding to quarters crosses, and 2**-8), in blocks whose absmax is +-1 (so y = x, and y = -1 exactly), an
    # all-zero block, subnormals, at storage offsets 0-2 and odd lengths (a partial last block), against the torch
    # reference on the GPU
    cpu = torch.device("cpu")
    edges = torch.arange(33, dtype=torch.float32) / 16 - 1
    points = [edges, edges - 2.0**-7, edges - 2.0**-8, torch.tensor([0.5, 0.0, 1e-30, 1e-39])]
    if quant_type != "fp4":
        points.append(nf4.format._thresholds(quant_type, cpu))
    probe, up, down = [torch.cat(points)], torch.cat(points), torch.cat(points)
    for _ in range(3):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        probe += [up, down, -up]
    probe = torch.cat(probe)
    rest = torch.zeros(-(-probe.numel() // 63) * 63)
    rest[: probe.numel()] = probe
    blocks = rest.view(-1, 63)
    ones = torch.ones(blocks.shape[0], 1)
    ones[::2] = -1
    x = torch.cat([torch.cat([ones, blocks], dim=1).flatten(), torch.zeros(64), torch.randn(64 * 40) * 1e3])
    for offset in (0, 1, 2):
        buffer = torch.zeros(x.numel() + 8, device="cuda", dtype=dtype)
        buffer[offset : offset + x.numel()] = x.to(dtype)
        xs = buffer[offset : offset + x.numel() + 2 * offset + 1]
        _poison()
        ours = ops.quantize(xs, quant_type, 64)
        ref = nf4.quantize(xs, quant_type, 64)
        assert torch.equal(ours.data, ref.data) and torch.equal(ours.absmax, ref.absmax)
        assert torch.equal(ours.nested_absmax, ref.nested_absmax) and ours.nested_offset == ref.nested_offset


def test_quantize_rejects_nan() -> None:
    x = torch.randn(4096, device="cuda")
    x[100] = float("nan")
    with pytest.raises(nf4.FormatError, match="NaN"):
        ops.quantize(x)


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 300])
@pytest.mark.parametrize("nk", [(4096, 4096), (1023, 4096), (4096, 14336), (64, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matmul_matches_dequantize_then_fp32_matmul(m: int, nk: tuple, dtype: torch.dtype) -> None:
    n, k = nk
    q = ops.quantize(torch.randn(n, k, device="cuda"), blocksize=64 if k % 64 == 0 else 32)
    x = torch.randn(2, m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    _poison()
    out = ops.matmul(x, q, bias)
    ref = x.double() @ ops.dequantize(q, dtype).double().T + bias.double()
    # fp32 accumulation over K of the same dtype-rounded weights: error ~ one rounding of the output dtype
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == dtype and out.shape == (2, m, n) and rel < {torch.float32: 1e-5}.get(dtype, 4e-3)


def test_matmul_input_gradient() -> None:
    q = ops.quantize(torch.randn(512, 256, device="cuda"))
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ops.matmul(x, q).float().pow(2).sum().backward()
    x_ref = x.detach().float().requires_grad_()
    (x_ref @ ops.dequantize(q, torch.float32).T).pow(2).sum().backward()
    rel = ((x.grad.float() - x_ref.grad).norm() / x_ref.grad.norm()).item()
    assert rel < 1e-2


@pytest.mark.parametrize(
    "mnk",
    [(1, 256, 128), (4, 256, 128), (1, 1024, 4096), (1, 8192, 8192), (2, 4096, 4096), (16, 4096, 4096),
     (16, 8192, 8192)],
)  # fmt: skip
def test_compile_fullgraph(mnk: tuple) -> None:
    # M = 1: the FMA kernel with x by plain loads (torch.compile's write analysis rejects inline PTX that takes a
    # pointer), split-K with fresh counters after eager calls made the cached ones (a real tensor in a fake trace
    # failed); one row of a weight of at least MIN_PARAMS and M = 2, 4, 16: the table kernels, through the opaque
    # nf4::matmul_table, so the same kernels as eager mode and the same bits (8192x8192 at M = 16: two row groups)
    from nf4.kernels import gemv_tc as kgemv_tc

    m, n, k = mnk
    q = ops.quantize(torch.randn(n, k, device="cuda"))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    eager = ops.matmul(x, q)
    compiled = torch.compile(lambda x: ops.matmul(x, q), fullgraph=True)(x)
    ref = x.double() @ ops.dequantize(q, torch.bfloat16).double().T
    assert ((compiled.double() - ref).norm() / ref.norm()).item() < 4e-3
    assert ((compiled.double() - eager.double()).norm() / ref.norm()).item() < 4e-3
    if m > 1 or n * k >= kgemv_tc.MIN_PARAMS:
        assert torch.equal(compiled, eager)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("nk", [(4100, 4096), (4097, 4160), (11, 14336), (28672, 8192)])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_decode_sizes(dtype: torch.dtype, double_quant: bool, nk: tuple, m: int) -> None:
    # the fused kernel (M <= 4) at real sizes, each x dtype: rows that end a partial row tile, rows of 65 blocks
    # (a partial last step), few rows (the most split-K), a 70B projection
    n, k = nk
    q = ops.quantize(torch.randn(n, k, device="cuda"), double_quant=double_quant)
    x = torch.randn(k, device="cuda", dtype=dtype) if m == 1 else torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    _poison()
    out = ops.matmul(x, q, bias)
    ref = x.double() @ ops.dequantize(q, dtype).double().T + bias.double()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == dtype and out.shape == (*x.shape[:-1], n) and rel < {torch.float32: 1e-5}.get(dtype, 4e-3)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize(
    "cfg",
    [
        (8, 1, 4, True),
        (32, 1, 4, True),
        (64, 1, 2, True),
        (16, 2, 3, True),
        (32, 4, 1, True),
        (64, 8, 2, True),
        (32, 1, 2, False),
    ],
    ids=[
        "rows8-warps1",
        "rows32-warps1",
        "rows64-warps1",
        "rows16-warps2-split3",
        "rows32-warps4",
        "rows64-warps8",
        "rows32-warps1-noprefetch",
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_configs(blocksize: int, cfg: tuple, dtype: torch.dtype, m: int) -> None:
    # the decode kernel's lookups are warp shuffles that rely on each lane holding its own level: every tile
    # shape, warp count and blocksize (other layouts of the code tile) gives the reference result
    from nf4.kernels import gemv as kgemv

    block_n, num_warps, split_k, prefetch = cfg
    n, k = 1000, 4096
    q = ops.quantize(torch.randn(n, k, device="cuda"), blocksize=blocksize)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    qargs = _qargs(q)
    config = kgemv.GemvConfig(
        block_n=block_n, nbk=max(1, 64 // (blocksize // 2)), num_warps=num_warps, split_k=split_k, prefetch=prefetch
    )
    _poison()
    out = kgemv.gemv(x, *qargs, n, None, config)
    ref = x.double() @ ops.dequantize(q, dtype).double().T
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < {torch.float32: 1e-5}.get(dtype, 4e-3)


@pytest.mark.parametrize("m", [1, 16])
def test_matmul_of_a_bare_quantized_tensor_captures_in_a_cuda_graph(m: int) -> None:
    # no offset tensor held by the caller: the op makes one on the device, which a graph can capture
    q = ops.quantize(torch.randn(512, 256, device="cuda"))
    x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    eager = ops.matmul(x, q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.matmul(x, q)  # warm-up (compiles the kernels) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.matmul(x, q)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, ops.matmul(x, q), rtol=0, atol=0)
    assert not torch.equal(out, eager)


@pytest.mark.parametrize("m", [1, 4, 16])
def test_split_k_sums_in_graphs_and_on_two_streams(m: int) -> None:
    # split-K slices are summed by each row tile's last program, with counters kept per stream that every launch
    # leaves at zero (the FMA kernel at M = 1; gemv_tc at 4 and gemv_tcm at 16 on a weight this small): graph
    # replays between eager calls, and two streams at once, give the bits of one eager call
    q = ops.quantize(torch.randn(1024, 14336, device="cuda"))  # few rows, long rows: many slices
    x = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
    want = ops.matmul(x, q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        out = ops.matmul(x, q)
    for _ in range(3):
        _poison()
        graph.replay()
        assert torch.equal(out, want) and torch.equal(ops.matmul(x, q), want)
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs += [ops.matmul(x, q) for _ in range(20)]
    torch.cuda.synchronize()
    assert all(torch.equal(o, want) for o in outs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_reads_x_at_any_offset(dtype: torch.dtype) -> None:
    # the kernel loads x 16 bytes at a time: rows that do not start on 16 bytes are copied first
    q = ops.quantize(torch.randn(300, 4096, device="cuda"))
    buffer = torch.randn(4096 + 8, device="cuda", dtype=dtype)
    w = ops.dequantize(q, dtype).double()
    for offset in range(8):
        x = buffer[offset : offset + 4096].unsqueeze(0)
        ref = x.double() @ w.T
        rel = ((ops.matmul(x, q).double() - ref).norm() / ref.norm()).item()
        assert rel < {torch.float32: 1e-5}.get(dtype, 4e-3)


@pytest.mark.parametrize("m", [9, 16])
def test_gemv_tcm_stages_only_x_inside_m_and_k(m: int) -> None:
    # M = 9-16 on a large weight copy each step's x tile to shared memory (rows past M and columns past K are
    # zero-filled, not read): x's rows are views into a buffer whose columns past K are NaN, cut into slices that
    # leave phantom steps (3 of 64) or a partial last step (K = 8256); the same bits as a contiguous copy of x
    from nf4.kernels import gemv_tcm as kgemv_tcm

    for k, split_k in ((8192, 3), (8256, 0)):
        q = ops.quantize(torch.randn(4096, k, device="cuda"))
        assert 4096 * k >= kgemv_tcm.XS_MIN_PARAMS
        buf = torch.full((m, k + 192), float("nan"), device="cuda", dtype=torch.bfloat16)
        buf[:, :k] = torch.randn(m, k, device="cuda")
        config = kgemv_tcm.GemvTcmConfig(split_k)
        out = kgemv_tcm.gemv_tcm(buf[:, :k], *_qargs(q), 4096, None, config)
        ref = buf[:, :k].double() @ ops.dequantize(q, torch.bfloat16).double().T
        assert ((out.double() - ref).norm() / ref.norm()).item() < TABLE_TOLERANCE
        assert torch.equal(kgemv_tcm.gemv_tcm(buf[:, :k].contiguous(), *_qargs(q), 4096, None, config), out)


def test_matmul_of_an_empty_batch() -> None:
    # zero rows of x: no fused-kernel launch (it needs M >= 1), an empty result of the right shape
    q = ops.quantize(torch.randn(64, 128, device="cuda"))
    out = ops.matmul(torch.randn(0, 128, device="cuda", dtype=torch.bfloat16), q)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("nkb", [(4097, 4096, 64), (28672, 8192, 64), (300, 1024, 32), (1000, 2048, 128)])
@pytest.mark.parametrize("m", [2, 5, 16, 33, 64])
def test_mma_small_batches(quant_type: str, dtype: torch.dtype, double_quant: bool, nkb: tuple, m: int) -> None:
    # the byte-permute tensor-core kernel (2 <= M <= 64, bf16/fp16; x tiles of 16, 64 rows; ops sends it M > 16,
    # and 2-16 under torch.compile) and ops' choice: its register lookup (inline PTX) for each level table and
    # dtype, an odd N (a partial row tile), a 70B projection, blocksizes 32 and 128
    from nf4.kernels import mma as kmma

    n, k, blocksize = nkb
    q = ops.quantize(torch.randn(n, k, device="cuda"), quant_type, blocksize, double_quant)
    qargs = _qargs(q)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    ref = x.double() @ ops.dequantize(q, dtype).double().T + bias.double()
    for matmul in (lambda: ops.matmul(x, q, bias), lambda: kmma.mma(x, *qargs, n, bias)):
        _poison()
        out = matmul()
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert out.dtype == dtype and out.shape == (m, n) and rel < 4e-3


# The table kernels hold each level rounded to x's dtype and scale a block's sum by its absmax in fp32; the
# reference rounds level x absmax. On 11 rows of int4 (levels k/7, inexact in bf16) the relative error of 22
# outputs exceeded 4e-3 on 2% of 300 draws, at most 5.2e-3 (their arithmetic emulated on the CPU; seen on the H200).
TABLE_TOLERANCE = 6e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case",
    [(28672, 8192, 64, "nf4", True), (8192, 28672, 64, "nf4", False), (4097, 4160, 64, "fp4", True),
     (11, 14336, 128, "int4", False), (1000, 4096, 256, "nf4", True)],
)  # fmt: skip
@pytest.mark.parametrize(
    ("name", "m"),
    [("tc", 1), ("tc", 2), ("tc", 3), ("tc", 4), ("tcm", 5), ("tcm", 8), ("tcm", 9), ("tcm", 16)],
)
@pytest.mark.parametrize("config", [None, (1,), (3, 1), (32,)], ids=["default", "split1", "split3-1sm", "split32"])
def test_table_kernels_sizes_and_configs(
    dtype: torch.dtype, case: tuple, name: str, m: int, config: tuple | None
) -> None:
    # the tensor-core table kernels (inline PTX: the shared-memory table, the mma fragments; split-K partial sums):
    # gemv_tc at M = 1-4 (x rows in the mma's columns beside the blocks), gemv_tcm at 5-16 (one or two n8 mmas a
    # k16, 64 or 80 registers); on the 70B projections, a partial last step (K = 4160) and odd N, fewer rows than a
    # warp's 16, blocksizes 128 / 256, each level table; one slice, 3 slices on one program an SM (many items a
    # program), 32 slices; each row of the output checked
    from nf4.kernels import gemv_tc as kgemv_tc
    from nf4.kernels import gemv_tcm as kgemv_tcm

    kernel, make_config = (
        (kgemv_tc.gemv_tc, kgemv_tc.GemvTcConfig) if name == "tc" else (kgemv_tcm.gemv_tcm, kgemv_tcm.GemvTcmConfig)
    )
    n, k, blocksize, quant_type, double_quant = case
    q = ops.quantize(torch.randn(n, k, device="cuda"), quant_type, blocksize, double_quant)
    qargs = _qargs(q)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    cfg = config and make_config(*config)
    _poison()
    out = kernel(x, *qargs, n, bias, cfg)
    ref = x.double() @ ops.dequantize(q, dtype).double().T + bias.double()
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    worst_row = ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()  # a row of x lost shows here
    assert out.dtype == dtype and out.shape == (m, n) and rel < TABLE_TOLERANCE and worst_row < 2e-2
    assert torch.equal(kernel(x, *qargs, n, bias, cfg), out)  # the slices summed in the same order
    if name == "tc" and m == 2:  # the mma's columns are independent: each row as gemv_tc alone gives it in the
        # same layout (3-4 rows, and one row of a large weight, add the block sums up in other orders)
        alone = dataclasses.replace(cfg or kgemv_tc.GemvTcConfig(), paired=False)
        for r in range(m):
            assert torch.equal(kernel(x[r : r + 1].clone(), *qargs, n, bias, alone)[0], out[r])
    if name == "tc" and m == 1:  # both layouts of one row (the paired one from PAIRED_MIN_PARAMS by default)
        paired = kgemv_tc.default_config(n, k, x.device).paired if cfg is None or cfg.paired is None else cfg.paired
        other = kernel(x, *qargs, n, bias, dataclasses.replace(cfg or kgemv_tc.GemvTcConfig(), paired=not paired))
        assert ((other.double() - ref).norm() / ref.norm()).item() < TABLE_TOLERANCE
    if m > 1 and config is None and ops._table_kernel(x, blocksize, n) is kernel:
        assert torch.equal(ops.matmul(x, q, bias), out)  # ops' choice in eager mode (M = 1: the test below)


def test_matmul_sends_one_row_of_a_large_weight_to_the_tensor_core_decode() -> None:
    # ops' choice at M = 1 (weights of at least MIN_PARAMS), in eager mode and in a CUDA graph (compiled, the FMA
    # kernel: test_compile_fullgraph)
    from nf4.kernels import gemv_tc as kgemv_tc

    n, k = 8192, kgemv_tc.MIN_PARAMS // 8192
    q = ops.quantize(torch.randn(n, k, device="cuda"))
    qargs = _qargs(q)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    want = kgemv_tc.gemv_tc(x, *qargs, n, None)
    assert torch.equal(ops.matmul(x, q), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.matmul(x, q)
    _poison()
    graph.replay()
    assert torch.equal(out, want)
