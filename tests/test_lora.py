"""LoRA on LinearNF4: forward and every adapter gradient against a plain-torch float reference, PEFT interop, merge.

The reference is the same model with each 4-bit weight dequantized into an ``nn.Linear`` and the LoRA update
added by forward hooks from leaf tensors, so it shares no code with ``nf4.lora``. Both compute in fp32 on the
same dequantized weights: they differ only by summation order, so the tolerances are fp32 round-off (1e-5).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nf4 import lora
from nf4.nn import LinearNF4, quantize_model

transformers = pytest.importorskip("transformers", reason="LoRA tests build a transformers Llama")

ATOL, RTOL = 1e-5, 1e-4  # fp32 round-off of the same maths in another order
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(hidden: int = 64, vocab: int = 96, seed: int = 0) -> nn.Module:
    """A 2-layer Llama with odd-ish sizes (GQA, ffn 3x) in fp32."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


def qlora_model(r: int = 8, dropout: float = 0.0, seed: int = 0, **kw: object) -> nn.Module:
    """The tiny Llama quantized (lm_head kept) with LoRA, B randomized so that every gradient is non-zero."""
    model = lora.add_lora(quantize_model(tiny_llama(seed=seed)), lora.LoraConfig(r=r, lora_dropout=dropout, **kw))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B["default"].weight.normal_(0, 0.05)
    return model


def float_reference(qmodel: nn.Module) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """The same model in plain torch: dequantized nn.Linear bases, LoRA added by hooks from leaf (A, B)."""
    ref = copy.deepcopy(qmodel)
    adapters = {}
    for name, m in list(lora.lora_layers(ref)):
        base = m.base_layer
        linear = nn.Linear(base.in_features, base.out_features, bias=False)
        linear.weight = nn.Parameter(base.qweight.dequantize(torch.float32), requires_grad=False)
        a = m.lora_A["default"].weight.detach().float().clone().requires_grad_()
        b = m.lora_B["default"].weight.detach().float().clone().requires_grad_()
        scale = m.scaling
        linear.register_forward_hook(lambda mod, inp, out, a=a, b=b, s=scale: out + s * (inp[0] @ a.T @ b.T))
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, linear)
        adapters[name] = (a, b, scale)
    return ref, adapters


def batch(vocab: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(seed))


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("fused", [False, True], ids=["modules", "fused"])
def test_forward_and_every_gradient_match_float_reference(fused: bool) -> None:
    model = qlora_model()
    assert lora.set_fused(model, fused) == 2 * len(TARGETS)
    ref, adapters = float_reference(model)
    ids = batch()
    loss = loss_of(model, ids)
    loss.backward()
    ref_loss = loss_of(ref, ids)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    assert len(adapters) == 2 * len(TARGETS)
    for name, m in lora.lora_layers(model):
        a, b, _ = adapters[name]
        torch.testing.assert_close(m.lora_A["default"].weight.grad, a.grad, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(m.lora_B["default"].weight.grad, b.grad, atol=ATOL, rtol=RTOL)
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_only_adapters_train_and_base_stays_4bit() -> None:
    model = qlora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora.lora_parameters(model)) == len(trainable)
    # No float copy of a quantized weight: every wrapped base is still a LinearNF4 holding uint8 codes.
    for _, m in lora.lora_layers(model):
        assert isinstance(m.base_layer, LinearNF4) and m.base_layer.weight.dtype == torch.uint8
    assert not any(
        type(m) is nn.Linear and m.weight.ndim == 2 and m.in_features == 64 and m.out_features == 64
        for m in model.model.modules()
    )
    assert model.lm_head.__class__ is nn.Linear  # "all-linear" leaves the output layer alone
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    loss_of(model, batch()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain, ckpt = qlora_model(dropout=0.1), qlora_model(dropout=0.1)
    lora.enable_gradient_checkpointing(ckpt)
    plain.train(), ckpt.train()
    ids = batch()
    for model in (plain, ckpt):
        torch.manual_seed(7)  # the same dropout masks; checkpointing replays them in the recomputation
        loss_of(model, ids).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL, msg=n)


def test_bf16_adapters_and_target_list() -> None:
    model = qlora_model(dtype=torch.bfloat16, target_modules=["q_proj", "v_proj"])
    names = [n for n, _ in lora.lora_layers(model)]
    assert sorted(n.rpartition(".")[2] for n in names) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert all(p.dtype == torch.bfloat16 for p in lora.lora_parameters(model))
    loss = loss_of(model, batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lora.lora_parameters(model))
    with pytest.raises(ValueError, match="match no linear layer"):
        lora.add_lora(quantize_model(tiny_llama()), lora.LoraConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        lora.LoraConfig(dtype=torch.float16)


def test_save_load_roundtrip_and_peft_key_names(tmp_path) -> None:
    model = qlora_model()
    lora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / lora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and sorted(config["target_modules"]) == sorted(TARGETS)
    with safe_open(str(tmp_path / "adapter" / lora.ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 2 * len(TARGETS)
    fresh = lora.load_adapter(quantize_model(tiny_llama()), tmp_path / "adapter")
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_peft_loads_our_adapter_with_our_logits(tmp_path) -> None:
    peft = pytest.importorskip("peft", reason="PEFT interop needs the peft package")
    model = qlora_model()
    lora.save_adapter(model, tmp_path / "adapter")
    # PEFT's base: the same model in float, each weight the dequantized NF4 weight we trained on.
    base = lora.dequantize_model(quantize_model(tiny_llama()))
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, model(ids).logits, atol=ATOL, rtol=RTOL)
    # And back: an adapter PEFT writes loads into ours.
    peft_model.save_pretrained(str(tmp_path / "from_peft"))
    again = lora.load_adapter(quantize_model(tiny_llama()), tmp_path / "from_peft")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_adapter_for_other_shapes_is_refused_and_model_untouched(tmp_path) -> None:
    lora.save_adapter(qlora_model(), tmp_path / "adapter")
    other = quantize_model(tiny_llama(hidden=32))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lora.AdapterError, match=r"shape \(8, 64\), the model expects \(8, 32\)"):
        lora.load_adapter(other, tmp_path / "adapter")
    assert not list(lora.lora_layers(other))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
    with pytest.raises(lora.AdapterError, match="no adapter_config.json"):
        lora.load_adapter(other, tmp_path)


def test_merge_equals_base_plus_adapter() -> None:
    model = qlora_model()
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
        merged = lora.merge_lora(model)
        assert not list(lora.lora_layers(merged)) and not any(isinstance(m, LinearNF4) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, want, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------------ the fused LoRA matmul (one node)


def fused_layer(in_features: int, out_features: int, dropout: float = 0.0, bias: bool = False) -> lora.LoraLinear:
    """A LoraLinear over a LinearNF4 with B randomized, on the fused path."""
    torch.manual_seed(0)
    layer = lora.LoraLinear(
        LinearNF4.from_linear(nn.Linear(in_features, out_features, bias=bias)),
        lora.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout),
    )
    nn.init.normal_(layer.lora_B["default"].weight, 0, 0.1)
    layer.fused = True
    return layer


def layer_reference(layer: lora.LoraLinear, x: torch.Tensor, mask: torch.Tensor | None, p: float) -> tuple:
    """Plain-torch ``x Wᵀ + bias + s·(d(x) Aᵀ) Bᵀ`` on the dequantized W: (y, leaf x, leaf A, leaf B)."""
    base = layer.base_layer
    w = base.qweight.dequantize(torch.float32)
    x = x.detach().clone().requires_grad_()
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    h = x if mask is None else x * mask / (1 - p)
    y = x @ w.T + layer.scaling * (h @ a.T @ b.T)
    return (y if base.bias is None else y + base.bias.detach()), x, a, b


# Odd sizes: partial 4-bit blocks, rows not a multiple of anything; 3-D input as a transformer feeds it.
@pytest.mark.parametrize("in_features,out_features", [(64, 96), (41, 9), (341, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_layer_forward_and_gradients_match_reference(in_features: int, out_features: int, bias: bool) -> None:
    layer = fused_layer(in_features, out_features, bias=bias)
    x = torch.randn(3, 7, in_features, requires_grad=True)
    gy = torch.randn(3, 7, out_features)
    y = layer(x)
    y.backward(gy)
    want, rx, ra, rb = layer_reference(layer, x, None, 0.0)
    want.backward(gy)
    torch.testing.assert_close(y, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad, rx.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, ra.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, rb.grad, atol=ATOL, rtol=RTOL)
    if bias:  # a bias that trains (add_lora freezes it; a bare LoraLinear does not)
        torch.testing.assert_close(layer.base_layer.bias.grad, gy.sum((0, 1)), atol=ATOL, rtol=RTOL)


def test_fused_layer_dropout_uses_one_mask_for_forward_and_backward() -> None:
    p = 0.3
    layer = fused_layer(64, 48, dropout=p).train()
    x = torch.randn(5, 64, requires_grad=True)
    gy = torch.randn(5, 48)
    torch.manual_seed(11)
    y = layer(x)
    y.backward(gy)
    # The node draws its keep-mask first thing, from the global generator: the same seed gives the same mask.
    torch.manual_seed(11)
    mask = torch.empty(5, 64, dtype=torch.bool).bernoulli_(1 - p)
    assert 0 < mask.sum() < mask.numel()
    want, rx, ra, rb = layer_reference(layer, x, mask, p)
    want.backward(gy)
    torch.testing.assert_close(y, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x.grad, rx.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, ra.grad, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, rb.grad, atol=ATOL, rtol=RTOL)


def test_fused_bf16_compute_matches_reference_within_bf16_rounding() -> None:
    layer = fused_layer(256, 192)
    layer.base_layer.compute_dtype = torch.bfloat16
    x = torch.randn(64, 256, requires_grad=True)
    gy = torch.randn(64, 192)
    y = layer(x)
    y.backward(gy)
    assert y.dtype == torch.float32 and layer.lora_A["default"].weight.grad.dtype == torch.float32
    want, rx, ra, rb = layer_reference(layer, x, None, 0.0)
    want.backward(gy)
    # bf16 inputs to every product (8 bits of mantissa, 2^-9 relative rounding each) summed over 256 terms;
    # errors measured here are ~1e-2 of the outputs' scale: 3e-2 leaves room without hiding a wrong formula.
    for got, ref in [
        (y, want),
        (x.grad, rx.grad),
        (layer.lora_A["default"].weight.grad, ra.grad),
        (layer.lora_B["default"].weight.grad, rb.grad),
    ]:
        assert (got - ref).norm() / ref.norm() < 3e-2


def test_fused_saves_less_for_backward_and_never_a_float_weight() -> None:
    """What autograd keeps between forward and backward, in the GPU setting (bf16 compute, fp32 adapters): the
    plain modules keep an fp32 copy of x for A's gradient; the fused node keeps bf16 x and [M, r], no W."""

    def saved_bytes(layer: lora.LoraLinear, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            layer(x).sum().backward()
        unique = {t.untyped_storage().data_ptr(): t for t in kept if t.dtype.is_floating_point}
        return sum(t.untyped_storage().nbytes() for t in unique.values()), kept

    x = torch.randn(2, 16, 128, dtype=torch.bfloat16, requires_grad=True)
    layer = fused_layer(128, 320)
    layer.base_layer.compute_dtype = torch.bfloat16
    fused, kept = saved_bytes(layer, x)
    layer.fused = False
    plain, _ = saved_bytes(layer, x)
    assert fused < plain
    assert not any(t.shape == (320, 128) and t.dtype.is_floating_point for t in kept)


def test_fused_model_with_checkpointing_and_dropout_gives_the_same_gradients() -> None:
    plain, ckpt = qlora_model(dropout=0.1), qlora_model(dropout=0.1)
    for model in (plain, ckpt):
        lora.set_fused(model)
        model.train()
    lora.enable_gradient_checkpointing(ckpt)
    ids = batch()
    for model in (plain, ckpt):
        torch.manual_seed(7)  # checkpointing replays the RNG: the recomputation draws the same masks
        loss_of(model, ids).backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL, msg=n)
