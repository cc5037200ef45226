"""QLoRA training step: nf4 against HF transformers + PEFT + bitsandbytes, same config, same run (GPU only).

The 1.1B Llama of ANCHORS.md (22 layers, hidden 2048, ffn 5632, 32 heads / 4 KV heads, vocab 32000), random bf16
weights, batch 4 x 2048 tokens, LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, gradient checkpointing, AdamW.
Anchor (H200, bnb 0.50.2): HF + PEFT + bnb 35.1k tokens/s, 26.7 GiB peak. Target: >= 2x the tokens/s at
<= 0.5x the peak memory.

Each variant runs in its own process (so peak memory is its own); the parent prints one JSON line per variant
and the ratios:

    python benchmarks/qlora_step.py                  # both, 10 timed steps after 3 warm-up steps
    python benchmarks/qlora_step.py --which ours --steps 20 --layers 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def random_model(layers: int, device: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(layers)).to(torch.bfloat16)
    return model


def build_ours(layers: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    from nf4 import lora
    from nf4.nn import quantize_model

    model = quantize_model(random_model(layers, "cuda"), compute_dtype=torch.bfloat16)
    torch.cuda.empty_cache()
    lora.add_lora(model, lora.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    lora.enable_gradient_checkpointing(model)
    return model, lora.lora_parameters(model)


def build_hf(layers: int) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        random_model(layers, "cpu").save_pretrained(folder)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}
        )
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def run_one(which: str, layers: int, batch: int, seq: int, steps: int, warmup: int) -> dict:
    model, params = (build_ours if which == "ours" else build_hf)(layers)
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, 32000, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "which": which,
        "layers": layers,
        "tokens_per_s": round(batch * seq / step, 1),
        "step_ms": round(step * 1e3, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "loss": float(loss),
        "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", choices=("ours", "hf", "both"), default="both")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("qlora_step.py needs a CUDA GPU (bitsandbytes' and nf4's fast paths are GPU paths)")
    if args.which != "both":
        print(json.dumps(run_one(args.which, args.layers, args.batch, args.seq, args.steps, args.warmup)))
        return
    results = {}
    for which in ("hf", "ours"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--which", which]  # the last --which wins
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        if out.returncode != 0:
            sys.exit(f"{which} failed:\n{out.stderr[-4000:]}")
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[which]))
    hf, ours = results["hf"], results["ours"]
    print(
        json.dumps(
            {
                "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
                "memory_ratio": round(ours["peak_gib"] / hf["peak_gib"], 3),
                "target": "speedup >= 2.0 and memory_ratio <= 0.5",
            }
        )
    )


if __name__ == "__main__":
    main()
