"""QLoRA training step: nf4, one fast step added at a time, against HF transformers + PEFT + bitsandbytes.

The 1.1B Llama of ANCHORS.md (22 layers, hidden 2048, ffn 5632, 32 heads / 4 KV heads, vocab 32000), random bf16
weights, batch 4 x 2048 tokens, LoRA r=16 alpha=16 on q,k,v,o,gate,up,down, gradient checkpointing, AdamW, grad
norm clipped at 0.3. Anchor (H200, bnb 0.50.2): HF + PEFT + bnb 35.1k tokens/s, 26.7 GiB peak. Target: >= 2x the
tokens/s at <= 0.5x the peak memory.

Variants, each in its own process (so that its peak memory is its own), the nf4 ones cumulative (nf4.fused.STEPS)
up to ``kernels``:

    hf-anchor  transformers + PEFT + bitsandbytes exactly as ANCHORS.md measured it (../shared/bench/anchors_gpu.py:
             bf16 everywhere, gradient_checkpointing_enable + enable_input_require_grads)
    hf       the same with peft.prepare_model_for_kbit_training, as the QLoRA recipe does (norms, embeddings and
             lm_head upcast to fp32: slower, and the fp32 lm_head makes fp32 logits)
    plain    nf4: LinearNF4 + LoraLinear modules, HF's loss on full logits     (nf4 finetune --no-fused)
    lora     + the LoRA-fused matmul (base and adapter one autograd node, x saved once)
    loss     + liger's fused linear cross-entropy (no [tokens, vocab] logits)
    kernels  + liger's RMSNorm, SwiGLU and rope                                  (nf4 finetune on CUDA)
    compiled          lora + loss, each decoder layer under torch.compile (the eager step is host-bound)
    compiled-kernels  kernels + torch.compile of each decoder layer
    compiled-swiglu   lora + loss + liger's SwiGLU, compiled layers     (nf4 finetune --compile on CUDA)

The compiled variants compile on their first warm-up step (one graph for all layers, tens of seconds), which
is never timed; ``first_step_s`` reports it.

One JSON line per variant (tokens/s, step ms, peak GiB, first and last loss, and against hf: speedup and
memory ratio), then a summary line naming the variants that meet the target. With ``--rounds N`` the variant
list runs N times, interleaved (each round's line is printed as it ends), and each variant's line gives the
median tokens/s and step time over its rounds and the highest peak.

Every variant trains the same random model on the same tokens, so the nf4 variants' first losses agree to bf16
rounding (hf's differs a little: its residual stream is fp32). The peak is
``torch.cuda.max_memory_allocated`` over steps 2.. (model building excluded, for every variant); the first step's
peak, which includes compiling where a variant compiles, is reported apart as ``first_step_peak_gib``;
``reserved_gib`` is what the caching allocator held (``max_memory_reserved``, same steps).

    PYTHONPATH=src python benchmarks/qlora_step.py                       # all of them, 6 timed steps after 2
    PYTHONPATH=src python benchmarks/qlora_step.py --variants plain,kernels --layers 4
    PYTHONPATH=src python benchmarks/qlora_step.py --variants hf-anchor,compiled-kernels --rounds 3  # noisy host
    PYTHONPATH=src python benchmarks/qlora_step.py --device cpu --layers 1 --batch 1 --seq 64 --steps 1 --warmup 1

On CPU (a smoke test of this script) the model is fp32, peak memory is the process's peak RSS, and variants that
cannot run there (bitsandbytes' 4-bit path, liger's GPU kernels) print a ``skipped`` line with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# benchmarks/kernels.py would shadow the `kernels` package, which transformers probes by importing it (an import
# that fails there surfaces in PEFT as "Could not import module 'BloomPreTrainedModel'"): drop this folder.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = (
    "hf-anchor",
    "hf",
    "plain",
    "lora",
    "loss",
    "kernels",
    "compiled",
    "compiled-kernels",
    "compiled-swiglu",
)
BASELINES = ("hf-anchor", "hf")
# The nf4.fused steps each nf4 variant switches on (cumulative).
STEPS = {
    "plain": (),
    "lora": ("lora",),
    "loss": ("lora", "loss"),
    "kernels": ("lora", "loss", "norm", "swiglu", "rope"),
    "compiled": ("lora", "loss", "compile"),
    "compiled-kernels": ("lora", "loss", "norm", "swiglu", "rope", "compile"),
    "compiled-swiglu": ("lora", "loss", "swiglu", "compile"),
}


class Skipped(Exception):
    """This variant cannot run on this device; the message says why."""


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
    )


def random_model(layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(llama_config(layers)).to(dtype)


def build_ours(variant: str, layers: int, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    from nf4 import fused, lora
    from nf4.nn import quantize_model

    model = quantize_model(random_model(layers, device, dtype), compute_dtype=dtype)
    if device == "cuda":
        torch.cuda.empty_cache()
    lora.add_lora(model, lora.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    lora.enable_gradient_checkpointing(model)
    try:
        fused.enable(model, STEPS[variant])
    except ValueError as e:
        raise Skipped(str(e)) from e
    return model, lora.lora_parameters(model)


def build_hf(recipe: str, layers: int, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    if device != "cuda":
        raise Skipped("bitsandbytes' 4-bit training path (Linear4bit + PEFT) is benchmarked on CUDA only")
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory() as folder:
        random_model(layers, "cpu", dtype).save_pretrained(folder)
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype, device_map={"": 0})
    if recipe == "hf":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def peak_gib(device: str, reserved: bool = False) -> float:
    if device == "cuda":
        return (torch.cuda.max_memory_reserved() if reserved else torch.cuda.max_memory_allocated()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_one(
    variant: str, layers: int, batch: int, seq: int, steps: int, warmup: int, device: str, profile: str | None = None
) -> dict:
    """Build one variant and time ``steps`` training steps after ``warmup`` (median step time).

    With ``profile`` (a folder), one more step runs under torch.profiler and its top kernels and ops by device
    time go to ``<profile>/<variant>.txt``: where the step's time goes.
    """
    from nf4 import fused, train

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if variant in BASELINES:
        model, params = build_hf(variant, layers, device, dtype)
    else:
        model, params = build_ours(variant, layers, device, dtype)
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []

    def loss_of_step() -> torch.Tensor:
        if variant in BASELINES:
            return model(input_ids=ids, labels=ids).loss
        total, n = train.loss_sum(model, {"input_ids": ids, "attention_mask": None, "labels": ids})
        return total / n

    def one_step() -> None:
        loss = loss_of_step()  # nf4's own training step (nf4 finetune): the fused loss when its step is on
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        one_step()
        sync()
        if i == 0:
            first = time.perf_counter() - t0
            first_peak = peak_gib(device)  # includes compiling, where a variant compiles
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = peak_gib(device)  # steps 2.. (the steady state): read before the diagnostics below
    reserved = peak_gib(device, reserved=True)
    saved = fused.saved_for_backward(model, loss_of_step) / 2**30  # outside eager checkpoints
    opt.zero_grad(set_to_none=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profiler(activities=activities) as prof:
            one_step()
            sync()
        sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        Path(profile).mkdir(parents=True, exist_ok=True)
        (Path(profile) / f"{variant}.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    step = statistics.median(times)
    return {
        "variant": variant,
        "steps_on": list(getattr(model, "nf4_fused", ())),
        "layers": layers,
        "tokens_per_s": round(batch * seq / step, 1),
        "step_ms": round(step * 1e3, 2),
        "first_step_s": round(first, 2),
        "peak_gib": round(peak, 3),
        "reserved_gib": round(reserved, 3),
        "first_step_peak_gib": round(first_peak, 3),
        "saved_gib": round(saved, 3),
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "trainable_params": sum(p.numel() for p in params),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    }


def child(variant: str, argv: list[str], timeout: float) -> dict:
    """Run one variant in a fresh process; its last stdout line is its JSON (or an error record)."""
    env = dict(os.environ)
    src = str(_HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    cmd = [sys.executable, __file__, *argv, "--variants", variant]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s (--timeout)"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"variant": variant, "error": out.stderr.strip()[-3000:] or f"exit code {out.returncode}"}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per variant, build and compile included")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the variant list this many times, interleaved; medians reported"
    )
    parser.add_argument("--profile", help="folder: one extra step per variant under torch.profiler, a table each")
    parser.add_argument(
        "--memory-budget",
        type=float,
        help="torch._functorch.config.activation_memory_budget for the compiled variants (0: recompute all it can)",
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: expected some of {VARIANTS}, got {variants}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; pass --device cpu for a smoke run of this script")
    if args.memory_budget is not None:
        torch._functorch.config.activation_memory_budget = args.memory_budget
    if len(variants) == 1 and args.rounds == 1:
        try:
            result = run_one(
                variants[0], args.layers, args.batch, args.seq, args.steps, args.warmup, args.device, args.profile
            )
        except Skipped as e:
            result = {"variant": variants[0], "skipped": str(e)}
        print(json.dumps(result))
        return
    skip = ("variants", "timeout", "rounds")
    argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in skip and v is not None]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for i in range(args.rounds):  # interleaved: a slow spell of the host hits every variant alike
        for variant in variants:
            r = child(variant, argv, args.timeout)
            runs[variant].append(r)
            if args.rounds > 1:
                print(json.dumps({"round": i, **r}), flush=True)
    results = {v: combine(rs) for v, rs in runs.items()}
    for variant, r in results.items():
        if variant not in BASELINES and "tokens_per_s" in r:
            for base in BASELINES:
                ref = results.get(base, {})
                if "tokens_per_s" in ref:
                    r[f"speedup_vs_{base}"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
                    r[f"memory_vs_{base}"] = round(r["peak_gib"] / ref["peak_gib"], 3)
        print(json.dumps(r), flush=True)
    done = [v for v in variants if "tokens_per_s" in results[v]]
    best = max((v for v in done if v not in BASELINES), key=lambda v: results[v]["tokens_per_s"], default=None)
    summary: dict[str, Any] = {"summary": {v: results[v]["tokens_per_s"] for v in done}, "best": best}
    # Judged against the faster baseline: the anchor's recipe, where it ran.
    base = next((b for b in BASELINES if b in done), None)
    if base:
        summary["baseline"] = base
        summary["target_met_by"] = [
            v
            for v in done
            if v not in BASELINES and results[v][f"speedup_vs_{base}"] >= 2.0 and results[v][f"memory_vs_{base}"] <= 0.5
        ]
    summary["target"] = "speedup >= 2.0 and memory ratio <= 0.5 against the baseline, by one variant"
    print(json.dumps(summary))


def combine(rounds: list[dict]) -> dict:
    """One record from a variant's rounds: median tokens/s and step time, the highest peak, every round's tokens/s.

    A round that failed or was skipped stands for the variant (its record is returned as is)."""
    bad = next((r for r in rounds if "tokens_per_s" not in r), None)
    if bad is not None or len(rounds) == 1:
        return bad or rounds[0]
    out = dict(rounds[-1])
    out["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in rounds)
    out["step_ms"] = round(statistics.median(r["step_ms"] for r in rounds), 2)
    out["peak_gib"] = max(r["peak_gib"] for r in rounds)
    out["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rounds]
    return out


if __name__ == "__main__":
    main()
