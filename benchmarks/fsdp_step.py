"""QLoRA training step of the 1.1B Llama: one GPU (plain nf4 QLoRA) against N GPUs (FSDP2, 4-bit all-gather).

The 1.1B config of ANCHORS.md (22 layers, hidden 2048, ffn 5632, 32 heads / 4 KV heads, vocab 32000), random bf16
weights saved once as an HF folder (``--model``), which both runs quantize the same way (NF4 + double quant); LoRA
r=16 alpha=16 on every linear layer but lm_head, gradient checkpointing, AdamW, global batch 4 x 2048 tokens. Under
torchrun each rank reads only its rows of the folder (nf4.fsdp) and takes ``batch / world`` of the same batch.

Every rank prints one JSON line (peak memory, its share of the 4-bit base); rank 0 adds one with tokens/s and the
losses, and, given ``--compare`` (the 1-GPU run's ``--out``), the loss parity and the speed-up::

    python benchmarks/fsdp_step.py --model /tmp/llama-1.1b --out /tmp/one.json
    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_step.py \
        --model /tmp/llama-1.1b --compare /tmp/one.json

On CPU (gloo, fp32), the same logic on a tiny config::

    python benchmarks/fsdp_step.py --device cpu --layers 2 --hidden 64 --ffn 192 --heads 4 --kv-heads 2 \
        --vocab 512 --batch 4 --seq 64 --steps 3 --warmup 1 --model /tmp/llama-tiny --out /tmp/one.json
    torchrun --standalone --nproc-per-node 2 benchmarks/fsdp_step.py --device cpu --layers 2 --hidden 64 --ffn 192 \
        --heads 4 --kv-heads 2 --vocab 512 --batch 4 --seq 64 --steps 3 --warmup 1 --model /tmp/llama-tiny \
        --compare /tmp/one.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# This folder holds a kernels.py, which would shadow the `kernels` package that transformers probes: drop it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def make_model(args: argparse.Namespace) -> None:
    """Random weights (seed 0) in bf16, saved as an HF folder: the one input both runs quantize."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.seq),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.model)


def build(args: argparse.Namespace, device: torch.device, distributed: bool) -> tuple[torch.nn.Module, list]:
    """The QLoRA model as ``nf4 finetune`` builds it: sharded by nf4.fsdp_train under torchrun, else whole."""
    from nf4 import checkpoint, fsdp_train, lora
    from nf4.train import TrainArgs

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    targs = TrainArgs(r=args.r, lora_alpha=args.r, lora_dropout=0.0, seed=0)
    if distributed:
        model = fsdp_train.build_model(args.model, targs, device, dtype)
    else:
        model = checkpoint.from_pretrained(args.model, dtype=dtype, compute_dtype=dtype).to(device)
        torch.manual_seed(targs.seed)
        lora.add_lora(model, targs.lora_config())
        lora.enable_gradient_checkpointing(model)
    return model, lora.lora_parameters(model)


def run(args: argparse.Namespace) -> None:
    from nf4 import fsdp
    from nf4.train import loss_sum, memory_mib

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        rank, world, device = fsdp.init_distributed(timeout_s=1200)
    else:
        rank, world, device = 0, 1, torch.device(args.device)
    if args.device == "cuda" and device.type != "cuda":
        raise SystemExit("no CUDA device: pass --device cpu for a logic check on a tiny config")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not split over {world} ranks")
    if rank == 0 and not (Path(args.model) / "config.json").is_file():
        make_model(args)
    if distributed:
        dist.barrier()
    model, params = build(args, device, distributed)
    model.train()
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    per = args.batch // world
    mine = ids[rank * per : (rank + 1) * per].to(device)
    batch = {"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": mine}
    n_tokens = args.batch * (args.seq - 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, _ = loss_sum(model, batch)
        (loss * world / n_tokens).backward()  # FSDP2 averages over ranks: this is the global mean's gradient
        total = loss.detach().double()
        if distributed:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(total) / n_tokens)
    local, whole = fsdp.base_bytes(model) if distributed else (None, None)
    peak = memory_mib(device) / 2**10  # peak allocated on GPU; peak resident memory on CPU
    line = {"rank": rank, "world": world, "peak_gib": round(peak, 3)}
    if local is not None:
        line |= {"base_mib_rank": round(local / 2**20, 3), "base_mib_whole": round(whole / 2**20, 3)}
    lines: list[Any] = [line]
    if distributed:
        lines = [None] * world
        dist.all_gather_object(lines, line)
    if rank == 0:
        for row in lines:
            print(json.dumps(row))
        step = statistics.median(times)
        summary = {
            "world": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "layers": args.layers,
            "tokens_per_s": round(args.batch * args.seq / step, 1),
            "step_ms": round(step * 1e3, 2),
            "peak_gib_per_rank": [row["peak_gib"] for row in lines],
            "losses": losses,
        }
        print(json.dumps(summary))
        if args.out:
            Path(args.out).write_text(json.dumps(summary))
        if args.compare:
            ref = json.loads(Path(args.compare).read_text())
            rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"], strict=True))
            parity = {
                "loss_max_rel_diff": rel,
                "speedup_vs_reference": round(summary["tokens_per_s"] / ref["tokens_per_s"], 3),
                "reference_world": ref["world"],
            }
            print(json.dumps(parity))
    if distributed:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF folder of the random model (written if missing)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4, help="global batch (split over the ranks)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="write rank 0's summary here (the reference for --compare)")
    parser.add_argument("--compare", help="a reference run's --out: print loss parity and speed-up")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
