"""The reference format: tables, bitsandbytes' CPU path as an oracle, properties, state dicts, bad input."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import nf4
from nf4 import codebook
from nf4.format import BLOCKSIZES, FLT_MIN, FormatError, QuantizedTensor

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the test oracle (pip install -e .[dev])")
F = bnb.functional

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------- tables


def test_nf4_table_is_pinned():
    assert codebook.levels("nf4").tolist() == list(codebook.NF4_LEVELS)
    assert torch.equal(codebook.levels("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert codebook.NF4_LEVELS[7] == 0.0 and codebook.NF4_LEVELS[0] == -1.0 and codebook.NF4_LEVELS[15] == 1.0


def test_fp4_table_equals_bitsandbytes():
    assert torch.equal(codebook.levels("fp4"), F.get_4bit_type("fp4", device="cpu"))


@pytest.mark.parametrize("bits", range(2, 9))
def test_normal_float_generator(bits):
    lv = codebook.normal_float(bits)
    assert lv.numel() == 2**bits and lv[0] == -1 and lv[-1] == 1 and (lv == 0).sum() == 1
    assert torch.all(lv[1:] > lv[:-1])
    assert (lv < 0).sum() == 2 ** (bits - 1) - 1  # asymmetric: one more positive level
    if bits == 4:
        assert (lv - codebook.levels("nf4")).abs().max() < 1e-6


def test_nf4_thresholds_are_bitsandbytes_literals():
    """The fp32 thresholds equal the decimal literals of bitsandbytes' CUDA kernel, each rounded once."""
    literals = [
        "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
        "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
        "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
        "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
    ]  # fmt: skip
    ours = codebook.midpoints(codebook.levels("nf4"))
    assert ours.tolist() == [codebook._nearest_f32(s) for s in literals]
    # four of them are not what ties-to-even from the float64 midpoint would give
    naive = ((codebook.levels("nf4").double()[1:] + codebook.levels("nf4").double()[:-1]) / 2).float()
    assert (ours != naive).nonzero().view(-1).tolist() == [0, 8, 12, 14]


def test_dynamic_map_equals_bitsandbytes():
    assert torch.equal(codebook.dynamic_map_signed(), F.create_dynamic_map(signed=True))


def test_reciprocal_table_is_the_measured_one():
    """rcp.approx: 1 ulp either side of 1/x for 13.2% of mantissas; exact at powers of two."""
    from nf4.format import _rcp_delta, _reciprocal

    delta = _rcp_delta(torch.device("cpu"))
    assert delta.numel() == 2**23 and set(delta.unique().tolist()) == {-1, 0, 1}
    assert (delta != 0).sum().item() == 1108522
    x = torch.tensor([1.0, 2.0, 0.5, 2.0**-126, 2.0**126, 3.0 * 2.0**126, 0.0])
    assert _reciprocal(x).tolist() == [1.0, 0.5, 2.0, 2.0**126, 2.0**-126, 0.0, float("inf")]


# --------------------------------------------------------------------------- bitsandbytes' CPU path as oracle


def _near_threshold(y: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Whether y lies within 2 ulp of a decision threshold (where the reciprocal's rounding decides)."""
    if quant_type == "fp4":
        thresholds, y = torch.tensor(codebook.FP4_MAGNITUDE_THRESHOLDS), y.abs()
    else:
        thresholds = codebook.midpoints(codebook.levels(quant_type))
    ulp = torch.nextafter(thresholds, torch.tensor(2.0)) - thresholds
    return ((y[:, None] - thresholds[None, :]).abs() <= 2 * ulp.abs()).any(dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_matches_bitsandbytes_cpu_on_random_grid(dtype, blocksize):
    """bnb's CPU path agrees with its CUDA path on non-zero blocks of normal numbers, except where y falls
    within an ulp of a threshold (CUDA's reciprocal is approximate): those elements only may differ."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)  # fresh inputs every run
    shape = (int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)) * 2 + 1)
    scale = 10 ** float(torch.empty(1).uniform_(-3, 3, generator=g))
    x = (torch.randn(shape, generator=g) * scale).to(dtype)
    q = nf4.quantize(x, "nf4", blocksize, double_quant=False)
    packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(q.absmax, state.absmax)
    ours = torch.stack([q.data.view(-1) >> 4, q.data.view(-1) & 15], 1).view(-1)[: x.numel()]
    theirs = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)[: x.numel()]
    differ = ours != theirs
    if differ.any():
        y = x.reshape(-1).float() / q.absmax.repeat_interleave(blocksize)[: x.numel()]
        assert _near_threshold(y[differ], "nf4").all(), f"codes differ away from a threshold: {y[differ][:5]}"
        assert (ours[differ] - theirs[differ]).abs().max() == 1
    # dequantize of bitsandbytes' own state: identical for fp32/bf16 (fp16: bnb's CPU path rounds like ours)
    assert torch.equal(nf4.dequantize(_from_bnb(packed, state)), F.dequantize_4bit(packed, state))


def _from_bnb(packed: torch.Tensor, state) -> QuantizedTensor:
    d = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    d["weight"] = packed
    return QuantizedTensor.from_state_dict(d)


# ------------------------------------------------------------------------------------------- properties

_shapes = st.tuples(st.integers(1, 9), st.integers(1, 300))


@settings(max_examples=60, deadline=None)
@given(
    shape=_shapes,
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
    blocksize=st.sampled_from(BLOCKSIZES),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
    log_scale=st.floats(-20, 20),
)
def test_properties(shape, dtype, quant_type, blocksize, double_quant, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0**log_scale).to(dtype)
    assume(torch.isfinite(x).all())  # fp16 overflows at the large scales
    q = nf4.quantize(x, quant_type, blocksize, double_quant)
    assert q.data.shape == ((x.numel() + 1) // 2, 1) and q.data.dtype == torch.uint8
    d = nf4.dequantize(q)
    assert d.shape == x.shape and d.dtype == x.dtype

    # per-element error <= absmax * half the widest gap (+ rounding of the output dtype and FP4's
    # truncated thresholds); blocks use the decoded absmax, so the bound holds with double quant too
    absmax = q.absmax_fp32().repeat_interleave(blocksize)[: x.numel()].view(shape)
    bound = absmax * codebook.widest_gap(quant_type) / 2 * (1 + 1e-5)
    xf = x.float()
    if double_quant:  # the block's values are scaled by its decoded, not its true, absmax
        true = nf4.quantize(x, quant_type, blocksize, False).absmax.repeat_interleave(blocksize)
        true = true[: x.numel()].view(shape)
        bound = bound + (absmax - true).abs()
    out_ulp = torch.finfo(dtype).eps * d.float().abs() + torch.finfo(dtype).tiny
    err = (d.float() - xf).abs()
    ok = err <= bound + out_ulp + FLT_MIN
    assert ok.all(), f"error {err[~ok][:3]} over bound {bound[~ok][:3]}"

    # quantize . dequantize . quantize is a fixed point of the codes, except FP4's -0 (code 8 decodes to
    # -0.0, which re-quantizes to +0's code 0 since -0.0 < 0 is false, as on the GPU); without double
    # quant also of absmax and the values (with it, the re-quantized absmax gets a new offset)
    q2 = nf4.quantize(d, quant_type, blocksize, double_quant)
    if quant_type != "fp4":
        assert torch.equal(q2.data, q.data)
    if not double_quant:
        assert torch.equal(q2.absmax, q.absmax) and torch.equal(nf4.dequantize(q2), d)


def test_bits_per_param():
    x = torch.randn(4096, 4096, dtype=torch.bfloat16)
    assert nf4.quantize(x, double_quant=False).bits_per_param == pytest.approx(4.5, abs=1e-6)
    assert nf4.quantize(x).bits_per_param == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)


def test_zero_blocks_and_odd_sizes_follow_cuda():
    x = torch.zeros(131)
    x[64:70] = torch.arange(1, 7)
    q = nf4.quantize(x, "nf4", 64, False)
    codes = torch.stack([q.data.view(-1) >> 4, q.data.view(-1) & 15], 1).view(-1)
    assert q.absmax.tolist() == [0.0, 6.0, 0.0]
    assert (codes[:64] == 0).all() and (codes[128:] == 0).all()  # all-zero blocks: code 0 (CUDA), incl. padding
    assert (codes[70:128] == 7).all()  # a zero in a non-zero block is NF4's exact 0
    d = nf4.dequantize(q)
    assert (d[:64] == 0).all() and (d[70:] == 0).all() and d[69] == 6.0


def test_subnormals_are_flushed_like_the_gpu():
    x = torch.tensor([1e-39, -1e-39, 1.0, -1e-40] + [0.0] * 60)
    q = nf4.quantize(x, "fp4", 64, False)
    codes = torch.stack([q.data.view(-1) >> 4, q.data.view(-1) & 15], 1).view(-1)
    assert codes[:4].tolist() == [0, 0, 3, 0]  # flushed to +0: no "-0" code 8 for a subnormal negative


# ------------------------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_dict_is_bitsandbytes_layout(quant_type, double_quant, dtype):
    x = torch.randn(48, 100).to(dtype)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    theirs = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()} | {"weight": packed}
    ours = nf4.quantize(x, quant_type, 64, double_quant).state_dict("weight")
    assert sorted(ours) == sorted(theirs)
    key = f"weight.quant_state.bitsandbytes__{quant_type}"
    for k in ours:  # the JSON's length follows the offset's digits, which may differ by an ulp: compared below
        assert ours[k].dtype == theirs[k].dtype and (k == key or ours[k].shape == theirs[k].shape), k
    meta_ours, meta_theirs = (json.loads(bytes(d[key].tolist())) for d in (ours, theirs))
    meta_theirs.pop("nested_offset", None), meta_ours.pop("nested_offset", None)
    assert meta_ours == meta_theirs
    assert list(json.loads(bytes(ours[key].tolist()))) == list(json.loads(bytes(theirs[key].tolist())))


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_dict_loads_and_dequantizes_exactly(double_quant):
    x = torch.randn(33, 77, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(x, blocksize=128, quant_type="nf4", compress_statistics=double_quant)
    q = _from_bnb(packed, state)
    assert q.shape == x.shape and q.dtype == x.dtype and q.blocksize == 128
    assert torch.equal(nf4.dequantize(q), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_our_state_dict_loads_in_bitsandbytes(quant_type, double_quant):
    x = torch.randn(65, 130, dtype=torch.float16)
    q = nf4.quantize(x, quant_type, 64, double_quant)
    sd = q.state_dict("weight")
    state = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}, "cpu")
    assert torch.equal(F.dequantize_4bit(sd["weight"], state), nf4.dequantize(q))
    back = QuantizedTensor.from_state_dict(sd)
    assert torch.equal(nf4.dequantize(back), nf4.dequantize(q))


# ------------------------------------------------------------------------------------------------ memory


def test_quantize_memory_is_bounded_by_the_input_size():
    """Quantizing a tensor of B bytes peaks at well under B extra (chunked), measured in a fresh process."""
    code = textwrap.dedent(
        """
        import resource, torch, nf4
        x = torch.randn(4096, 4096)  # 64 MiB fp32
        nf4.quantize(torch.randn(64, 64))  # imports and caches warm
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        q = nf4.quantize(x)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    extra_kib = int(out.stdout.split()[-1])
    assert extra_kib < 64 * 1024, f"quantize needed {extra_kib} KiB beyond a 64 MiB input"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "tensor", [torch.ones(8, dtype=torch.int32), torch.ones(8, dtype=torch.bool), torch.ones(8, dtype=torch.complex64)]
)
def test_rejects_non_float_dtypes(tensor):
    with pytest.raises(ValueError, match=str(tensor.dtype)):
        nf4.quantize(tensor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_nan_and_inf(bad):
    x = torch.randn(300)
    x[200] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*block 3"):
        nf4.quantize(x)


def test_rejects_bad_options_and_empty():
    with pytest.raises(ValueError, match="blocksize 48"):
        nf4.quantize(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="quant_type 'nf3'"):
        nf4.quantize(torch.randn(64), quant_type="nf3")
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.randn(0, 5))
    with pytest.raises(ValueError, match="dequantize to torch.int8"):
        nf4.dequantize(nf4.quantize(torch.randn(64)), torch.int8)


def _sd(double_quant: bool = True) -> dict[str, torch.Tensor]:
    return nf4.quantize(torch.randn(20, 30), double_quant=double_quant).state_dict("w")


def _with_json(sd: dict[str, torch.Tensor], **changes) -> dict[str, torch.Tensor]:
    key = "w.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist())) | changes
    return sd | {key: torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: {k: v for k, v in sd.items() if k != "w.absmax"}, "missing key 'w.absmax'"),
        (lambda sd: {k: v for k, v in sd.items() if "quant_state" not in k}, "quant_state"),
        (lambda sd: sd | {"w.absmax": sd["w.absmax"].float()}, "w.absmax: expected dtype torch.uint8"),
        (lambda sd: sd | {"w": sd["w"][:-1]}, "w: expected 300 elements"),
        (lambda sd: sd | {"w.nested_absmax": sd["w.nested_absmax"].half()}, "nested_absmax: expected dtype"),
        (lambda sd: _with_json(sd, shape=[20, 31]), "expected 310 elements"),
        (lambda sd: _with_json(sd, blocksize=48), "blocksize 48"),
        (lambda sd: _with_json(sd, quant_type="fp4"), "does not match quant_type"),
        (lambda sd: _with_json(sd, dtype="int8"), "invalid quant-state JSON"),
        (lambda sd: _with_json(sd, nested_offset="x"), "nested_offset must be a finite number"),
        (
            lambda sd: sd | {"w.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)},
            "invalid quant-state JSON",
        ),
    ],
)
def test_from_state_dict_rejects_bad_state(mutate, message):
    with pytest.raises(FormatError, match=message):
        QuantizedTensor.from_state_dict(mutate(_sd()), prefix="w")


# ----------------------------------------------------------------------------------------------- concat


def _parts(double_quant: bool, quant_type: str = "nf4") -> list[QuantizedTensor]:
    torch.manual_seed(0)
    shapes, scales = [(64, 192), (16, 192), (40, 192)], [1.0, 30.0, 0.01]  # offsets far apart
    return [nf4.quantize(torch.randn(s) * c, quant_type, 64, double_quant) for s, c in zip(shapes, scales, strict=True)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_concat_without_double_quant_is_exact(quant_type):
    parts = _parts(False, quant_type)
    fused = nf4.concat(parts)
    assert fused.shape == (120, 192) and fused.quant_type == quant_type
    assert torch.equal(nf4.dequantize(fused), torch.cat([nf4.dequantize(q) for q in parts]))


def test_concat_with_double_quant_keeps_codes_and_moves_absmax_by_half_a_step():
    parts = _parts(True)
    fused = nf4.concat(parts)
    assert fused.double_quant and fused.absmax.dtype == torch.uint8
    assert torch.equal(fused.data, torch.cat([q.data for q in parts]))
    want = torch.cat([q.absmax_fp32() for q in parts])
    got = fused.absmax_fp32()
    # half the widest gap of the 8-bit map, in each 256-block's scale (+ fp32 rounding)
    gap = fused.nested_quant_map.sort().values.diff().max()
    bound = (fused.nested_absmax * gap / 2).repeat_interleave(256)[: got.numel()] * (1 + 1e-5)
    assert ((got - want).abs() <= bound).all()
    assert not torch.equal(got, want)  # three offsets became one: re-encoded, not copied
    assert nf4.concat(parts[:1]) is parts[0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: [], "at least one"),
        (lambda p: [p[0], nf4.quantize(torch.randn(8, 128), double_quant=True)], "with 192 columns"),
        (lambda p: [p[0], nf4.quantize(torch.randn(192))], "2-D"),
        (lambda p: [p[0], nf4.quantize(torch.randn(3, 192), blocksize=128)], "ends inside a block"),
        (lambda p: [p[0], nf4.quantize(torch.randn(8, 192), double_quant=False)], "double_quant"),
        (lambda p: [p[0], nf4.quantize(torch.randn(8, 192), "fp4")], "quant_type"),
        (lambda p: [p[0], nf4.quantize(torch.randn(8, 192).half())], "dtype"),
    ],
)
def test_concat_rejects_parts_that_do_not_stack(make, message):
    with pytest.raises(ValueError, match=message):
        nf4.concat(make(_parts(True)))
