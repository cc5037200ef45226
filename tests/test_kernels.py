"""Every Triton kernel under TRITON_INTERPRET=1 on CPU tensors, against the reference format (tiny sizes)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
# @triton.jit reads TRITON_INTERPRET when nf4.kernels is first imported, which another test may do first.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="run as: TRITON_INTERPRET=1 pytest tests/test_kernels.py"
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nf4 import format  # noqa: E402
from nf4.kernels import common  # noqa: E402
from nf4.kernels import dequantize as kdequantize  # noqa: E402
from nf4.kernels import gemm as kgemm  # noqa: E402
from nf4.kernels import gemv as kgemv  # noqa: E402
from nf4.kernels import gemv_tc as kgemv_tc  # noqa: E402
from nf4.kernels import gemv_tcm as kgemv_tcm  # noqa: E402
from nf4.kernels import mma as kmma  # noqa: E402
from nf4.kernels import quantize as kquantize  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _qargs(q: format.QuantizedTensor) -> tuple:
    offset = None if q.nested_offset is None else torch.tensor(q.nested_offset, dtype=torch.float32)
    return (q.data, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, offset, q.blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("n", [7, 1000, 64 * 9 + 1])
def test_quantize_and_dequantize_equal_reference(quant_type: str, blocksize: int, n: int) -> None:
    x = torch.randn(n, dtype=torch.bfloat16) * 3
    x[:blocksize] = 0  # an all-zero block: NaN scale, every code 0
    x[-1] = 1e-39  # a subnormal: flushed, as the GPU reference does
    data, absmax = kquantize.quantize_4bit(x, quant_type, blocksize)
    ref = format.quantize(x, quant_type, blocksize, double_quant=False)
    assert torch.equal(data, ref.data) and torch.equal(absmax, ref.absmax)
    codes, nested_absmax, offset = kquantize.double_quantize(absmax)
    ref_dq = format.double_quantize(ref)
    assert torch.equal(codes, ref_dq.absmax) and torch.equal(nested_absmax, ref_dq.nested_absmax)
    assert offset.item() == ref_dq.nested_offset
    for q in (ref, ref_dq):
        for dtype in DTYPES:
            out = kdequantize.dequantize(*_qargs(q), n, dtype)
            assert torch.equal(out, format.dequantize(q, dtype).view(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantize_flushes_subnormals_beside_a_tiny_absmax(quant_type: str) -> None:
    """A subnormal x is coded as 0 only because it is flushed first; that shows where the block's absmax is barely
    normal (x / absmax ~ 0.67 otherwise). The kernel flushes in its multiply (FTZ on the GPU)."""
    x = torch.randn(64 * 300) * 3
    x[64 * 200 : 64 * 201] = torch.linspace(-1.5e-38, 1.5e-38, 64)  # absmax 1.5e-38, the rest mostly subnormal
    data, absmax = kquantize.quantize_4bit(x, quant_type, 64)
    ref = format.quantize(x, quant_type, 64, double_quant=False)
    assert torch.equal(data, ref.data) and torch.equal(absmax, ref.absmax)
    assert len(set(ref.data[64 * 100 : 64 * 100 + 32].flatten().tolist())) > 1  # the block is not all one code


def _ulps_around(values: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Every fp32 value within k ulps of each of ``values``."""
    out, up, down = [values], values.clone(), values.clone()
    for _ in range(k):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-2.0))
        out += [up, down]
    return torch.cat(out)


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
def test_quantize_lookup_is_exact_at_thresholds_and_bucket_edges(quant_type: str) -> None:
    # the encoder's bucket lookup against format's count of thresholds, where it could go wrong: within 3 ulps of
    # every threshold and of every bucket edge (where y * BUCKETS rounded to quarters crosses an integer: 2**-7
    # below the edge; and 2**-8 below, where eighths did), at +-1, 0 and NaN; each block holds 1.0 so its absmax is 1
    edges = torch.arange(2 * kquantize._BUCKETS + 1, dtype=torch.float32) / kquantize._BUCKETS - 1
    edges = torch.cat([edges, edges - 2.0**-7, edges - 2.0**-8])
    probe = _ulps_around(torch.cat([format._thresholds(quant_type, torch.device("cpu")), edges]))
    probe = torch.cat([probe, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])])
    rest = torch.zeros(-(-probe.numel() // 63) * 63)
    rest[: probe.numel()] = probe
    x = torch.cat([torch.ones(rest.numel() // 63, 1), rest.view(-1, 63)], dim=1).flatten()
    data, absmax = kquantize.quantize_4bit(x, quant_type, 64)
    ref = format.quantize(x, quant_type, 64, double_quant=False)
    assert torch.equal(absmax, ref.absmax) and torch.equal(data, ref.data)


def test_double_quantize_many_nested_blocks() -> None:
    absmax = torch.rand(256 * 3 + 5) * 4
    codes, nested_absmax, offset = kquantize.double_quantize(absmax)
    q = format.QuantizedTensor(absmax, absmax, absmax, "nf4", 64, torch.Size([1]), torch.float32)
    ref = format.double_quantize(q)
    assert torch.equal(codes, ref.absmax) and torch.equal(nested_absmax, ref.nested_absmax)


@triton.jit
def _encode_8bit_probe(y_ptr, table_ptr, out_ptr, n, KEY_MIN: tl.constexpr, SIDE: tl.constexpr):
    i = tl.program_id(0) * 1024 + tl.arange(0, 1024)
    y = tl.load(y_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + i, kquantize._encode_8bit(y, table_ptr, KEY_MIN, SIDE), mask=i < n)


def test_encode_8bit_lookup_is_exact_at_its_steps_and_bucket_edges() -> None:
    # within 3 ulps of every step of the reference encoder (each map midpoint) and every bucket edge, both signs,
    # and 0, +-1, tiny values and NaN: the lookup equals format's binary search
    dyn = format._dynamic_map(torch.device("cpu"))
    steps = (dyn[1:] + dyn[:-1]) / 2
    keys = torch.arange(kquantize._DQ_KEY_MIN, 128 << 6, dtype=torch.int64)
    edges = (keys << 17).to(torch.int32).view(torch.float32)
    points = torch.cat([steps, edges, -edges, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 2.75e-7])])
    y = _ulps_around(points)
    y = torch.cat([y, torch.tensor([float("nan")])])
    out = torch.empty(y.numel(), dtype=torch.int32)
    table = kquantize._dq_table(y.device)
    _encode_8bit_probe[(triton.cdiv(y.numel(), 1024),)](
        y, table, out, y.numel(), KEY_MIN=kquantize._DQ_KEY_MIN, SIDE=kquantize._DQ_SIDE
    )
    assert torch.equal(out, format._encode_8bit(y, dyn).to(torch.int32))


@pytest.mark.parametrize("slots", [1, 4, 256])
def test_double_quantize_offset_is_the_same_for_any_split_of_the_sum(
    slots: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the 4-bit pass's programs add their float64 sums of absmax into `slots` sums in another order than format's
    # sum, and give its offset bit for bit (the sum is exact); the double-quant kernel leaves them zeroed for the
    # next call, which gives the same bytes
    monkeypatch.setattr(kquantize, "_SUM_SLOTS", slots)
    monkeypatch.setattr(common, "_ZEROED", {})
    x = torch.randn(64 * 37 * 33 + 5) * torch.logspace(-3, 2, 64 * 37 * 33 + 5)
    ref = format.quantize(x, "nf4", 64, double_quant=True)
    for _ in range(2):
        data, codes, nested_absmax, offset = kquantize.quantize(x, "nf4", 64, double_quant=True)
        assert offset.item() == ref.nested_offset
        assert torch.equal(data, ref.data) and torch.equal(codes, ref.absmax)
        assert torch.equal(nested_absmax, ref.nested_absmax)
    sums, counter = kquantize._scratch(x.device)
    assert not sums.any() and not counter.any()


def test_quantizes_from_several_threads_each_get_their_own_offset() -> None:
    # the pass adds into the stream's sums and the double-quant kernel reads and zeroes them: another thread's pass
    # must not come between the two launches (the interpreter, which cannot run two kernels at once, fails without
    # the lock too)
    from concurrent.futures import ThreadPoolExecutor

    xs = [torch.randn(64 * 256 * 3) * scale for scale in (1.0, 5.0, 0.1, 40.0)]
    refs = [format.quantize(x, "nf4", 64, double_quant=True) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: [kquantize.quantize(xs[i], "nf4", 64, True) for _ in range(3)], range(4)))
    for ref, runs in zip(refs, outs, strict=True):
        for _, codes, nested_absmax, offset in runs:
            assert offset.item() == ref.nested_offset and torch.equal(codes, ref.absmax)
            assert torch.equal(nested_absmax, ref.nested_absmax)


def test_double_quantize_zeroes_its_sums_when_its_launch_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_ZEROED", {})
    x = torch.randn(64 * 40)

    launch = kquantize.run

    def failing(kernel: object, *args: object, **consts: object) -> None:  # the pass adds into the sums; the
        if kernel is kquantize._double_quantize_kernel:  # kernel that zeroes them fails
            raise RuntimeError("launch failed")
        launch(kernel, *args, **consts)

    monkeypatch.setattr(kquantize, "run", failing)
    with pytest.raises(RuntimeError, match="launch failed"):
        kquantize.quantize(x, "nf4", 64, double_quant=True)
    sums, counter = kquantize._scratch(x.device)
    assert not sums.any() and not counter.any()


def test_quantize_nan_gives_nan_absmax() -> None:
    x = torch.randn(300)
    x[70] = float("nan")
    assert kquantize.quantize_4bit(x, "nf4", 64)[1][1].isnan()


# Tolerance: both sides multiply the same dtype-rounded weights and accumulate in fp32 (ours in another order),
# then round once to the output dtype: ~ one rounding of that dtype, relative to the output's norm.
TOLERANCE = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}


# (n, k, blocksize): a partial row tile (n % 32), a partial last step (3 blocks a row, 2 a step), blocksizes
# other than 64 (other tiles; at 256 x's step tile is as large as the thread count), and configs: split-K
# (uneven slices, an empty slice) and no prefetch.
GEMV_CASES = [(33, 256, 64), (40, 192, 64), (17, 512, 32), (9, 384, 128), (5, 768, 256)]
GEMV_CONFIGS = [None, kgemv.GemvConfig(block_n=16, split_k=3), kgemv.GemvConfig(block_n=8, split_k=4, prefetch=False)]


@pytest.mark.parametrize("nkb", GEMV_CASES)
@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=["default", "split3", "split4-noprefetch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_matches_dequantize_then_fp32_matmul(
    nkb: tuple, config: kgemv.GemvConfig | None, dtype: torch.dtype, double_quant: bool, m: int
) -> None:
    n, k, blocksize = nkb
    q = format.quantize(torch.randn(n, k), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = kgemv.gemv(x, *_qargs(q), n, bias, config)
    ref = x.float() @ format.dequantize(q, dtype).float().T + bias.float()
    assert out.dtype == dtype and out.shape == (m, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_reads_x_through_a_view(dtype: torch.dtype) -> None:
    # x as views (the kernel loads 16 bytes of x at a time): a column of a matrix, at an odd element offset, rows
    # of an odd stride, 4 rows (MAX_M)
    q = format.quantize(torch.randn(8, 128), double_quant=False)
    big = torch.randn(129, 9, dtype=dtype)
    views = (big[:128, 1].unsqueeze(0), big.flatten()[1:129].unsqueeze(0), big.T[:4, :128], big.T[5:, 1:])
    for x in views:
        ref = x.float() @ format.dequantize(q, dtype).float().T
        out = kgemv.gemv(x, *_qargs(q), 8, None)
        assert ((out.float() - ref).norm() / ref.norm()).item() < TOLERANCE[dtype]


def test_split_k_leaves_its_tile_counters_at_zero() -> None:
    # a row tile's last program to finish sums the slices and sets the tile's counter back to 0: the next launch
    # finds the counters zeroed and, summing in the same order, gives the same bits
    q = format.quantize(torch.randn(70, 512))
    x = torch.randn(2, 512, dtype=torch.bfloat16)
    config = kgemv.GemvConfig(block_n=16, split_k=3)
    first = kgemv.gemv(x, *_qargs(q), 70, None, config)
    assert torch.equal(kgemv.gemv(x, *_qargs(q), 70, None, config), first)
    assert not common.tile_counters(x.device, 5).any()


def test_tracing_sees_fake_tensors_and_gives_fresh_counters() -> None:
    # torch.compile's Inductor runs an op's implementation on fake tensors with is_compiling() False: there the
    # split-K counters must be a fresh traced tensor, not the cached real one (which failed a compiled GPU decode)
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    cached = common.tile_counters(torch.device("cpu"), 5)
    assert not common.tracing()
    with FakeTensorMode():
        assert common.tracing()
        traced = common.tile_counters(torch.device("cpu"), 5)
    assert isinstance(traced, FakeTensor) and traced is not cached
    assert common.tile_counters(torch.device("cpu"), 5) is cached


def test_gemv_reads_codes_at_any_byte_offset() -> None:
    # the kernel reads codes as int32 words: codes that start mid-word (a view into a larger buffer) still work
    q = format.quantize(torch.randn(8, 128), double_quant=False)
    for offset in (1, 2, 3):
        buffer = torch.zeros(q.data.numel() + offset, dtype=torch.uint8)
        buffer[offset:] = q.data.reshape(-1)
        data = buffer[offset:].view(q.data.shape)
        x = torch.randn(1, 128)
        ref = x @ format.dequantize(q, torch.float32).T
        out = kgemv.gemv(x, data, *_qargs(q)[1:], 8, None)
        assert ((out - ref).norm() / ref.norm()).item() < TOLERANCE[torch.float32]


def test_gemv_rejects_partial_blocks_per_row() -> None:
    assert not kgemv.supported(100, 64) and kgemv.supported(128, 64)


# (n, k, blocksize): rows ending a partial row tile (n % 128, % 32), a partial last step (3 blocks a row, 2 a step),
# blocksizes 32 / 128 / 256 (tiles of 16 / 64 / 128 code bytes a row); configs: split-K with uneven slices and an
# empty one, two blocks a step, 16-row tiles.
MMA_CASES = [(130, 192, 64), (17, 512, 32), (40, 384, 128), (5, 768, 256)]
MMA_CONFIGS = [None, kmma.MmaConfig(block_n=32, nbk=2, split_k=3), kmma.MmaConfig(block_n=16, split_k=4)]
# The tensor-core kernel rounds each level to x's dtype and scales in fp32, where dequantize rounds level * absmax:
# two roundings of a weight apart, so twice the tolerance (5 outputs of M = 1, 200 draws: bf16 passed 1x 198 times,
# fp16 reached 0.99x; none came near 2x).
MMA_TOLERANCE = {dtype: 2 * tolerance for dtype, tolerance in TOLERANCE.items()}


@pytest.mark.parametrize("nkb", MMA_CASES)
@pytest.mark.parametrize("config", MMA_CONFIGS, ids=["default", "split3-nbk2", "rows16-split4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_mma_matches_dequantize_then_fp32_matmul(
    nkb: tuple, config: kmma.MmaConfig | None, dtype: torch.dtype, double_quant: bool, m: int
) -> None:
    n, k, blocksize = nkb
    q = format.quantize(torch.randn(n, k), "fp4" if n == 17 else "nf4", blocksize, double_quant)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = kmma.mma(x, *_qargs(q), n, bias, config)
    ref = x.float() @ format.dequantize(q, dtype).float().T + bias.float()
    assert out.dtype == dtype and out.shape == (m, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[dtype]


def test_mma_reads_x_through_a_view() -> None:
    # rows of an odd stride (a transposed matrix's rows: column stride 1 after .T of a [K, M] slice), an odd offset
    q = format.quantize(torch.randn(20, 128), double_quant=False)
    big = torch.randn(9, 300, dtype=torch.float16)
    for x in (big[:, 1:129], big[2:5, 7:135]):
        ref = x.float() @ format.dequantize(q, torch.float16).float().T
        out = kmma.mma(x, *_qargs(q), 20, None)
        assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[torch.float16]


def test_mma_takes_half_precision_whole_blocks_only() -> None:
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert kmma.supported(x, 128, 64) and kmma.supported(x.half(), 128, 64)
    assert not kmma.supported(x.float(), 128, 64) and not kmma.supported(x, 100, 64)


# (n, k, blocksize, double_quant, dtype): fewer rows than a warp's 16 (rows past N masked), a partial last step
# (K % 256), blocksizes 128 / 256 (one block over several column slots), both dtypes, double quant or not; configs:
# one slice, and two slices on one program (its items in a row, their partial sums added by a second launch); one
# row of x in the paired-quad layout (large weights' by default), one slice and two on one program.
GEMV_TC_CASES = [(5, 256, 64, True, torch.bfloat16), (130, 192, 64, False, torch.float16),
                 (257, 1024, 128, True, torch.float16), (64, 512, 256, False, torch.bfloat16)]  # fmt: skip
GEMV_TC_CONFIGS = [None, kgemv_tc.GemvTcConfig(split_k=1), kgemv_tc.GemvTcConfig(split_k=2, programs_per_sm=1),
                   kgemv_tc.GemvTcConfig(split_k=1, paired=True),
                   kgemv_tc.GemvTcConfig(split_k=2, programs_per_sm=1, paired=True)]  # fmt: skip


@pytest.mark.parametrize("case", GEMV_TC_CASES)
@pytest.mark.parametrize(
    "config",
    GEMV_TC_CONFIGS,
    ids=["default", "split1", "split2-one-program", "paired-split1", "paired-split2-one-program"],
)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_tc_matches_dequantize_then_fp32_matmul(case: tuple, config: kgemv_tc.GemvTcConfig | None, m: int) -> None:
    # the interpreter runs the kernel's fragment bookkeeping (which lane holds which rows, k, block slots and x
    # rows) with an einsum in place of the mma and a computed pair in place of the table: a wrong slot or row shows
    # here; each row of x is checked on its own, so rows swapped or summed together fail
    n, k, blocksize, double_quant, dtype = case
    q = format.quantize(torch.randn(n, k), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(m, k, dtype=dtype) * torch.tensor([1.0, 10.0, 0.1, 3.0][:m], dtype=dtype)[:, None]
    bias = torch.randn(n, dtype=dtype)
    out = kgemv_tc.gemv_tc(x, *_qargs(q), n, bias, config)
    ref = x.float() @ format.dequantize(q, dtype).float().T + bias.float()
    assert out.dtype == dtype and out.shape == (m, n)
    for row in range(m):
        assert ((out[row].float() - ref[row]).norm() / ref[row].norm()).item() < MMA_TOLERANCE[dtype]


def test_gemv_tc_reads_x_and_codes_through_views() -> None:
    # x at an odd element offset (the kernel loads 16 bytes of x at a time), codes starting mid-word; a second
    # call gives the same bits
    q = format.quantize(torch.randn(24, 256), double_quant=False)
    x = torch.randn(300, dtype=torch.bfloat16)[3:259].unsqueeze(0)
    buffer = torch.zeros(q.data.numel() + 5, dtype=torch.uint8)
    buffer[5:] = q.data.reshape(-1)
    data = buffer[5:].view(q.data.shape)
    config = kgemv_tc.GemvTcConfig(split_k=1)
    out = kgemv_tc.gemv_tc(x, data, *_qargs(q)[1:], 24, None, config)
    ref = x.float() @ format.dequantize(q, torch.bfloat16).float().T
    assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[torch.bfloat16]
    assert torch.equal(kgemv_tc.gemv_tc(x, data, *_qargs(q)[1:], 24, None, config), out)


def test_gemv_tc_reads_two_rows_of_x_at_any_stride() -> None:
    # rows 260 elements apart (not a multiple of 8: copied for the 16-byte loads) and 264 apart (read in place)
    q = format.quantize(torch.randn(40, 256))
    for stride in (260, 264):
        x = torch.randn(2, stride, dtype=torch.float16)[:, :256]
        out = kgemv_tc.gemv_tc(x, *_qargs(q), 40, None)
        ref = x.float() @ format.dequantize(q, torch.float16).float().T
        assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[torch.float16]


def test_gemv_tc_takes_1_to_4_half_precision_rows_of_whole_64_blocks() -> None:
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    assert kgemv_tc.supported(x, 128, 64) and kgemv_tc.supported(x.half(), 128, 128)
    assert kgemv_tc.supported(torch.cat([x] * 4), 128, 64) and not kgemv_tc.supported(torch.cat([x] * 5), 128, 64)
    assert not kgemv_tc.supported(x.float(), 128, 64) and not kgemv_tc.supported(x[:0], 128, 64)
    assert not kgemv_tc.supported(x, 128, 32) and not kgemv_tc.supported(x[:, :96], 96, 32)


@pytest.mark.parametrize("steps", [1, 2, 5, 16, 32, 56, 112])
@pytest.mark.parametrize("tiles", [8, 32, 112, 224])
def test_best_split_counts_the_slices_the_launch_makes(steps: int, tiles: int) -> None:
    # the launch cuts K into slices of ceil(steps / split) steps; best_split scores and returns that count, so the
    # launch keeps it, and no other count of at least 2 steps a slice (at most 32) fills the 528 programs better
    split = kgemv_tc.best_split(tiles, steps, 528)
    per = -(-steps // split)
    assert -(-steps // per) == split and (split == 1 or per >= 2) and split <= 32

    def fill(slices: int) -> float:
        return tiles * slices / (-(-tiles * slices // 528) * 528)

    made = {-(-steps // -(-steps // s)) for s in range(1, min(steps, 32) + 1) if s == 1 or -(-steps // s) >= 2}
    assert all(fill(other) <= fill(split) + 0.02 for other in made)


def test_best_split_fills_the_8b_gate_projection_with_4_slices() -> None:
    # 14336x4096 at M = 1: 112 row tiles, 16 steps; 4 slices fill 528 programs as well as 8 (scored as a split of
    # 14 before the twentieth session: 3-7% slower on an H200)
    assert kgemv_tc.best_split(112, 16, 528) == 4 and kgemv_tc.best_split(224, 32, 528) == 7


# M = 2-16: one n8 mma a k16 (M <= 8) or two (M > 8), rows of x past M masked; the cases above (rows past N, a
# partial last step: K % 128, blocksizes 128 / 256 over several blocks' k-ranges), one slice or two on one program.
# (The interpreter takes ~3 s a call: each M with one config.)
GEMV_TCM_RUNS = [(2, None), (7, kgemv_tcm.GemvTcmConfig(split_k=1)),
                 (9, kgemv_tcm.GemvTcmConfig(split_k=2, programs_per_sm=1)), (16, None),
                 (12, kgemv_tcm.GemvTcmConfig(split_k=2, programs_per_sm=1, groups=2)),
                 (6, kgemv_tcm.GemvTcmConfig(groups=2))]  # fmt: skip


@pytest.mark.parametrize("case", GEMV_TC_CASES)
@pytest.mark.parametrize(
    "run",
    GEMV_TCM_RUNS,
    ids=["m2-default", "m7-split1", "m9-split2-one-program", "m16-default", "m12-two-groups", "m6-two-groups"],
)
def test_gemv_tcm_matches_dequantize_then_fp32_matmul(case: tuple, run: tuple) -> None:
    m, config = run
    n, k, blocksize, double_quant, dtype = case
    q = format.quantize(torch.randn(n, k), blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(m, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype)
    out = kgemv_tcm.gemv_tcm(x, *_qargs(q), n, bias, config)
    ref = x.float() @ format.dequantize(q, dtype).float().T + bias.float()
    assert out.dtype == dtype and out.shape == (m, n)
    assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[dtype]
    assert ((out.float() - ref).norm(dim=1) / ref.norm(dim=1)).max().item() < 2 * MMA_TOLERANCE[dtype]  # each row


def test_gemv_tcm_reads_no_x_past_k() -> None:
    # x's rows are views into a buffer whose columns past K are NaN, so a read past K would show: a short last
    # slice's phantom steps (8 steps in slices of 3), a partial last step (K = 192). (Loads of x without masks
    # where neither occurs, at 8 and 16 rows, were timed in the twenty-second session: the same time, dropped.)
    for m, k, split_k in ((16, 1024, 2), (8, 1024, 4), (16, 1024, 3), (8, 1024, 3), (16, 192, 1)):
        q = format.quantize(torch.randn(40, k))
        buf = torch.full((m, k + 128), float("nan"), dtype=torch.bfloat16)
        buf[:, :k] = torch.randn(m, k)
        x = buf[:, :k]
        out = kgemv_tcm.gemv_tcm(x, *_qargs(q), 40, None, kgemv_tcm.GemvTcmConfig(split_k=split_k))
        ref = x.float() @ format.dequantize(q, torch.bfloat16).float().T
        assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[torch.bfloat16], (m, k, split_k)


def test_gemv_tcm_reads_x_and_codes_through_views() -> None:
    # rows of x at an odd offset and a row stride that is not K (the kernel loads 16 bytes of a row at a time, so
    # both are copied), x as a transposed matrix's rows, codes starting mid-word; a second call gives the same bits
    q = format.quantize(torch.randn(24, 256), double_quant=False)
    buffer = torch.zeros(q.data.numel() + 5, dtype=torch.uint8)
    buffer[5:] = q.data.reshape(-1)
    data = buffer[5:].view(q.data.shape)
    config = kgemv_tcm.GemvTcmConfig(split_k=1)
    big = torch.randn(12, 300, dtype=torch.bfloat16)
    for x in (big[1:4, 3:259], big[:, 8:264], torch.randn(256, 5, dtype=torch.bfloat16).T):
        out = kgemv_tcm.gemv_tcm(x, data, *_qargs(q)[1:], 24, None, config)
        ref = x.float() @ format.dequantize(q, torch.bfloat16).float().T
        assert ((out.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[torch.bfloat16]
        assert torch.equal(kgemv_tcm.gemv_tcm(x, data, *_qargs(q)[1:], 24, None, config), out)


@pytest.mark.parametrize(("m", "programs"), [(1, 2), (3, 2), (2, 1)])
def test_gemv_tc_sums_slices_in_the_kernel_as_the_second_launch_does(
    monkeypatch: pytest.MonkeyPatch, m: int, programs: int
) -> None:
    # small weights sum their slices at the kernel's end (tickets per row tile, the last drawer adds them), large
    # ones by sum_slices: the same slice order, so the same bits; 3 slices of 5 row tiles on 2 programs, so one
    # program takes a tile's last ticket while another holds its others, or on one program (15 items: its tickets
    # in two rounds of 8)
    q = format.quantize(torch.randn(600, 768), double_quant=True)
    x = torch.randn(m, 768, dtype=torch.bfloat16)
    bias = torch.randn(600, dtype=torch.bfloat16)
    config = kgemv_tc.GemvTcConfig(split_k=3, programs_per_sm=programs)
    assert 600 * 768 <= kgemv_tc.SUM_IN_KERNEL_MAX_PARAMS
    in_kernel = kgemv_tc.gemv_tc(x, *_qargs(q), 600, bias, config)
    monkeypatch.setattr(kgemv_tc, "SUM_IN_KERNEL_MAX_PARAMS", 0)
    launched = kgemv_tc.gemv_tc(x, *_qargs(q), 600, bias, config)
    assert torch.equal(in_kernel, launched)
    ref = x.float() @ format.dequantize(q, torch.bfloat16).float().T + bias.float()
    assert ((in_kernel.float() - ref).norm() / ref.norm()).item() < MMA_TOLERANCE[torch.bfloat16]


def test_gemv_tcm_takes_2_to_16_half_precision_rows_of_whole_64_blocks() -> None:
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert kgemv_tcm.supported(x, 128, 64) and kgemv_tcm.supported(x.half().repeat(8, 1), 128, 128)
    assert not kgemv_tcm.supported(x[:1], 128, 64) and not kgemv_tcm.supported(x.repeat(9, 1)[:17], 128, 64)
    assert not kgemv_tcm.supported(x.float(), 128, 64) and not kgemv_tcm.supported(x, 128, 32)


def test_table_kernels_only_on_ampere_or_newer(monkeypatch: pytest.MonkeyPatch) -> None:
    # their mma.sync.m16n8k16 (bf16 / fp16) and cp.async need compute capability 8.0: ptxas rejects them for a T4
    # (7.5) or a V100 (7.0), so there ops sends 1-16 rows to the FMA and tl.dot kernels, which compile for both
    from nf4 import ops

    capability = {0: (7, 5), 1: (8, 0), 2: (9, 0), 3: (7, 0), 4: (12, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device.index])
    common.ampere_or_newer.cache_clear()
    try:
        gpus = [common.ampere_or_newer(torch.device("cuda", i)) for i in range(5)]
        assert gpus == [False, True, True, False, True] and common.ampere_or_newer(torch.device("cpu"))
    finally:
        common.ampere_or_newer.cache_clear()
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    assert (
        ops._table_kernel(x, 64, 4096) is kgemv_tc.gemv_tc
        and ops._table_kernel(x.repeat(8, 1), 64, 64) is kgemv_tcm.gemv_tcm
    )
    for module in (kgemv_tc, kgemv_tcm):
        monkeypatch.setattr(module, "ampere_or_newer", lambda device: False)
    assert ops._table_kernel(x, 64, 4096) is None and ops._table_kernel(x.repeat(8, 1), 64, 64) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bits_equal_reference_into_any_view(dtype: torch.dtype) -> None:
    """A byte's two values leave as one word: bit for bit the reference's (flushed products +0), also where
    ``out`` is a view whose words straddle (decoded apart, then copied)."""
    x = torch.randn(9, 320) * 3
    x.view(-1)[:128] *= 1e-38 / 3  # blocks of tiny normals: their products flush to zero
    q = format.quantize(x, blocksize=64)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    ref = format.dequantize(q, dtype).view(-1).view(bits)
    assert torch.equal(kdequantize.dequantize(*_qargs(q), x.numel(), dtype).view(bits), ref)
    out = torch.full((x.numel() + 1,), float("nan"), dtype=dtype)[1:]
    kdequantize.dequantize(*_qargs(q), x.numel(), dtype, out=out)
    assert torch.equal(out.view(bits), ref)


@pytest.mark.parametrize("blocksize", [32, 64])
def test_dequantize_partial_last_block_and_many_programs(blocksize: int) -> None:
    n = (kdequantize._SMALL[0] // (blocksize // 2)) * blocksize * 2 + blocksize + 7  # 2 programs + a partial block
    q = format.quantize(torch.randn(n), blocksize=blocksize)
    out = kdequantize.dequantize(*_qargs(q), n, torch.bfloat16)
    assert torch.equal(out, format.dequantize(q, torch.bfloat16).view(-1))


def test_gemm_any_shape() -> None:
    n, k = 9, 41  # K not a multiple of the block, odd N: blocks straddle rows
    q = format.quantize(torch.randn(n, k), blocksize=32)
    x = torch.randn(4, k)
    out = kgemm.gemm(x, *_qargs(q), n, None)
    torch.testing.assert_close(out, x @ format.dequantize(q).T)


def test_table_kernels_run_through_an_opaque_op_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile reaches the table kernels through nf4::matmul_table, which Inductor calls as it is (it would
    # drop their register cap): fullgraph compiles, the fake gives the shape, the values are the kernels' own
    monkeypatch.setattr(kgemv_tc, "MIN_PARAMS", 0)  # one row of a small weight, here
    q = format.quantize(torch.randn(48, 256))
    qargs = (*_qargs(q), 48, None)
    for m, kernel in ((1, kgemv_tc.gemv_tc), (3, kgemv_tc.gemv_tc), (5, kgemv_tcm.gemv_tcm)):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        compiled = torch.compile(lambda x: torch.ops.nf4.matmul_table(x, *qargs) * 2, fullgraph=True)
        assert torch.equal(compiled(x), kernel(x, *qargs) * 2)
    with pytest.raises(AssertionError):  # fp32 x has no table kernel: ops never sends it here
        torch.ops.nf4.matmul_table(torch.randn(3, 256), *qargs)


@pytest.mark.skipif(not common._DIRECT, reason="Triton < 3.6: every launch goes through Triton")
def test_launch_hooks_are_seen_in_both_triton_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    # common.run launches cached kernels directly only when no launch hook (a profiler) is installed: Triton 3.6+
    # holds the hooks in a chain that is empty by default, earlier versions a callable or None
    chain = triton.knobs.runtime.launch_enter_hook
    assert not common._hooked()
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    assert common._hooked()
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", None)
    assert not common._hooked()
    if hasattr(chain, "calls"):
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", type(chain)())
        triton.knobs.runtime.launch_enter_hook.add(lambda metadata: None)
        assert common._hooked()
