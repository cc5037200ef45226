"""nf4.fused: which steps run where, the CPU fallback, and liger's loss and rope against the plain path.

liger's kernels are Triton GPU kernels. Under ``TRITON_INTERPRET=1`` (as ``make test`` runs) its fused linear
cross-entropy and rope run on CPU tensors and are checked here against the plain maths; its RMSNorm and SwiGLU
do not run in the interpreter (it passes Python floats where the kernels call ``.to``), so they are checked
for wiring (same parameters, same keys) here and for numbers in tests/gpu/test_fused_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from nf4 import fused, lora, train
from nf4.nn import quantize_model

transformers = pytest.importorskip("transformers", reason="the fused path targets transformers' Llama")
from test_lora import ATOL, RTOL, batch, qlora_model, tiny_llama  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or not fused.has_liger(),
    reason="liger's kernels run on CPU only under TRITON_INTERPRET=1, with liger-kernel installed",
)


def test_cpu_defaults_to_the_plain_path_and_refuses_liger_clearly() -> None:
    model = qlora_model()
    assert fused.default_steps(model) == ()
    assert fused.default_steps(model, False) == ()
    assert fused.default_steps(model, compile=True) == ("compile",)
    assert fused.default_steps(model, False, compile=True) == ("compile",)  # --no-fused --compile
    with pytest.raises(ValueError, match="Triton GPU kernels; the model is on cpu"):
        fused.default_steps(model, True)
    with pytest.raises(ValueError, match=r"cannot enable \['loss'\]"):
        fused.enable(model, ["lora", "loss"])
    with pytest.raises(ValueError, match="unknown fused step"):
        fused.enable(model, ["flash"])
    assert not any(m.fused for _, m in lora.lora_layers(model))  # a refused call changes nothing
    fused.enable(model, ["lora"])  # the LoRA-fused matmul runs anywhere
    assert model.nf4_fused == ("lora",) and all(m.fused for _, m in lora.lora_layers(model))


def test_train_takes_the_plain_loss_unless_the_loss_step_is_on() -> None:
    model = qlora_model()
    ids = batch()
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    fused.enable(model, ["lora"])
    loss, n = train.loss_sum(model, b)
    logits = model(ids).logits[:, :-1].flatten(0, 1)
    want = torch.nn.functional.cross_entropy(logits, ids[:, 1:].flatten(), reduction="sum")
    assert n == ids[:, 1:].numel()
    torch.testing.assert_close(loss, want, atol=ATOL, rtol=RTOL)


@needs_interpreter
def test_fused_loss_equals_plain_loss_and_gradients() -> None:
    plain, fast = qlora_model(), qlora_model()
    ids = batch()
    labels = ids.clone()
    labels[0, :5] = train.IGNORE  # a prompt without loss
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fast.nf4_fused = ("loss",)  # the step alone, as enable() sets it on a GPU
    (want, n_want), (got, n_got) = train.loss_sum(plain, b), train.loss_sum(fast, b)
    assert n_got == n_want == int((labels[:, 1:] != train.IGNORE).sum())
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    want.backward()
    got.backward()
    for p, q in zip(lora.lora_parameters(plain), lora.lora_parameters(fast), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=RTOL)


@needs_interpreter
def test_liger_rope_takes_llama_rotary_embeddings_as_they_come() -> None:
    from liger_kernel.transformers.functional import liger_rope
    from transformers.models.llama import modeling_llama

    config = tiny_llama().config
    rotary = modeling_llama.LlamaRotaryEmbedding(config)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)  # GQA: 4 query heads, 2 KV heads, 9 positions
    cos, sin = rotary(q, torch.arange(9)[None])
    want = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    got = liger_rope(q.clone(), k.clone(), cos, sin, None, 1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL)


def test_fused_modules_keep_parameters_keys_and_adapters() -> None:
    model = qlora_model()
    before = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    adapter = lora.adapter_state_dict(model)
    fused._replace_modules(model, norm=True, swiglu=True)
    assert list(model.state_dict()) == keys
    assert all(p is before[n] for n, p in model.named_parameters())  # moved, not copied
    assert lora.adapter_state_dict(model).keys() == adapter.keys()
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, fused.FusedSwiGLU) and isinstance(layer.mlp.gate_proj, lora.LoraLinear)
    assert isinstance(layer.input_layernorm, fused.FusedRMSNorm) and isinstance(model.model.norm, fused.FusedRMSNorm)
    assert layer.input_layernorm.weight.dtype == torch.float32  # add_lora's fp32 norms stay fp32
    with pytest.raises(ValueError, match="hidden_act silu"):
        gelu = quantize_model(tiny_llama())
        gelu.config.hidden_act = "gelu"
        fused._replace_modules(gelu, norm=False, swiglu=True)


def test_rope_patch_keeps_cpu_on_the_original_and_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)  # undone after
    model = qlora_model()
    ids = batch()
    with torch.no_grad():
        want = model(ids).logits
        fused._patch_rope()
        patched = modeling_llama.apply_rotary_pos_emb
        fused._patch_rope()
        assert modeling_llama.apply_rotary_pos_emb is patched and patched._nf4_fused
        torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)


def test_compiled_layers_match_eager_with_one_graph_for_all_layers() -> None:
    """Each layer's 4-bit offsets differ; as tensors they do not specialize the graph, so one compile serves both."""
    plain, fast = qlora_model(), qlora_model()
    offsets = {m.nested_offset for m in fast.modules() if type(m).__name__ == "LinearNF4"}
    assert len(offsets) > 1
    for model in (plain, fast):
        lora.enable_gradient_checkpointing(model)
        model.train()
    fused.enable(plain, ["lora"])
    fused.enable(fast, ["lora", "compile"])
    assert fast.nf4_fused == ("lora", "compile")
    ids = batch()
    b = {"input_ids": ids, "attention_mask": None, "labels": ids}
    losses = []
    torch._dynamo.reset()  # forget other tests' compiled code; the counters are cleared on their own
    torch._dynamo.utils.counters.clear()
    try:
        for model in (plain, fast):
            loss, _ = train.loss_sum(model, b)
            loss.backward()
            losses.append(loss.detach())
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=RTOL)
    for p, q in zip(lora.lora_parameters(plain), lora.lora_parameters(fast), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=RTOL)


def _kept_for_backward(checkpointing: bool, steps: list[str]) -> tuple[int, object]:
    model = qlora_model()
    if checkpointing:
        lora.enable_gradient_checkpointing(model)
    model.train()
    fused.enable(model, steps)
    ids = batch()
    b = {"input_ids": ids, "attention_mask": None, "labels": ids}
    return fused.saved_for_backward(model, lambda: train.loss_sum(model, b)[0]), model.config


def test_checkpointed_layers_keep_only_their_inputs_for_backward_compiled_or_not() -> None:
    """With checkpointing a forward keeps each layer's inputs and what runs after the layers, compiled or not.

    Compiled, the checkpoint is traced into each layer's graph and AOTAutograd's partitioner picks what to save:
    this pins that it recomputes the layer rather than keeping its activations.
    """
    unchecked, config = _kept_for_backward(False, ["lora"])
    eager, _ = _kept_for_backward(True, ["lora"])
    torch._dynamo.reset()
    try:
        compiled, _ = _kept_for_backward(True, ["lora", "compile"])
    finally:
        torch._dynamo.reset()
    tokens = batch().numel()
    hidden = tokens * config.hidden_size * 4  # fp32
    rope = 2 * batch().shape[1] * (config.hidden_size // config.num_attention_heads) * 4  # cos and sin
    after = hidden + 2 * tokens * config.vocab_size * 4  # the final norm's input, the logits and their softmax
    print(f"kept for backward: {unchecked} unchecked, {eager} eager, {compiled} compiled")
    assert eager <= after + hidden
    assert compiled <= config.num_hidden_layers * (hidden + rope) + after + hidden
    assert compiled < unchecked / 3


def test_compiled_layers_recompute_with_the_forwards_dropout_masks() -> None:
    """A compiled layer is recomputed inside its backward graph; its dropout masks must be the forward's, not new
    draws. Checked by the gradient against the loss's change along it, every loss drawn from the same seed (so with
    the same masks): a backward that drew its own masks differentiates another function."""
    model = qlora_model(dropout=0.5)
    lora.enable_gradient_checkpointing(model)
    model.train()
    fused.enable(model, ["lora", "compile"])
    ids = batch()
    b = {"input_ids": ids, "attention_mask": None, "labels": ids}
    params = lora.lora_parameters(model)

    def loss() -> torch.Tensor:
        torch.manual_seed(7)
        return train.loss_sum(model, b)[0]

    torch._dynamo.reset()
    try:
        loss().backward()
        grads = [p.grad.clone() for p in params]
        eps = 1e-4  # the loss is curved enough that 1e-3 is off by 2% even eagerly
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=eps)
        up = loss().item()
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=-2 * eps)
        down = loss().item()
    finally:
        torch._dynamo.reset()
    slope, want = (up - down) / (2 * eps), sum(float((g * g).sum()) for g in grads)
    print(f"slope {slope}, |g|^2 {want}")
    assert slope == pytest.approx(want, rel=1e-2)
