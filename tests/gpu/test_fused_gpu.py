"""nf4.fused on a GPU (skipped without CUDA or liger-kernel): every step on, against the plain path.

The same tiny Llama in bf16 with the same adapters, one batch: the loss and every adapter gradient of the
fused path (LoRA-fused matmul, liger's loss, RMSNorm, SwiGLU, rope) against the plain modules + HF loss.
Both round to bf16 in different places (the plain path's LoRA runs in fp32), so the bounds are bf16-sized.
"""

from __future__ import annotations

import pytest
import torch

from nf4 import fused, lora, ops, train
from nf4.nn import quantize_model

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not ops.HAS_TRITON or not fused.has_liger(), reason="needs CUDA and liger-kernel"
)
transformers = pytest.importorskip("transformers")


def gpu_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = quantize_model(transformers.LlamaForCausalLM(config).to(torch.bfloat16)).cuda()
    lora.add_lora(model, lora.LoraConfig(r=8, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_B["default"].weight.normal_(0, 0.02)
    lora.enable_gradient_checkpointing(model)
    return model.train()


@pytest.mark.parametrize("steps", [("lora",), ("lora", *fused.LIGER_STEPS)])
def test_fused_steps_match_plain_path(steps: tuple[str, ...]) -> None:
    plain, fast = gpu_model(), fused.enable(gpu_model(), steps)
    assert fused.default_steps(fast) == ("lora", *fused.LIGER_STEPS)
    assert fused.default_steps(fast, compile=True) == ("lora", "loss", "swiglu", "compile")
    ids = torch.randint(0, 1000, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    labels = ids.clone()
    labels[:, :40] = train.IGNORE
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    (want, n), (got, m) = train.loss_sum(plain, b), train.loss_sum(fast, b)
    assert n == m and got.dtype == torch.float32
    assert abs(got.item() - want.item()) / want.item() < 1e-2
    want.backward()
    got.backward()
    for p, q in zip(lora.lora_parameters(plain), lora.lora_parameters(fast), strict=True):
        assert (q.grad - p.grad).norm() / p.grad.norm() < 5e-2


def test_compiled_checkpointed_layers_keep_what_eager_checkpointing_keeps() -> None:
    """On CUDA the layers' ops are Triton kernels in the compiled graph: the partitioner must still recompute them.

    Without nf4.fused._RecomputeWholeLayer the 1.1B benchmark peaked at 7.4 GiB compiled against 2.5 eager (H200,
    torch 2.11): the untagged matmul outputs were saved. This checks at small size what one forward keeps for
    backward outside eager checkpoints (nf4.fused.saved_for_backward); H200, 2026-11-27: 3,666,388 bytes compiled
    against 3,627,988 eager.
    """
    ids = torch.randint(0, 1000, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    b = {"input_ids": ids, "attention_mask": None, "labels": ids}
    kept = {}
    torch._dynamo.reset()
    try:
        for steps in (("lora",), ("lora", "compile")):
            model = fused.enable(gpu_model(), steps)
            kept[steps] = fused.saved_for_backward(model, lambda m=model: train.loss_sum(m, b)[0])
    finally:
        torch._dynamo.reset()
    config = model.config
    layer_inputs = config.num_hidden_layers * ids.numel() * config.hidden_size * 2  # bf16 hidden states
    print(f"kept for backward: eager {kept[('lora',)]}, compiled {kept[('lora', 'compile')]} bytes")
    assert kept[("lora", "compile")] <= kept[("lora",)] + 2 * layer_inputs
