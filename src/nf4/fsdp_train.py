"""``nf4 finetune --fsdp``: the QLoRA loop of nf4.train on FSDP2, one process a GPU, launched by torchrun.

    torchrun --nproc-per-node 2 -m nf4.cli finetune MODEL DATA --out runs/x --fsdp

Each rank builds the model on the meta device, shards every decoder layer and the root with ``fully_shard``, then
reads only its rows of each tensor from the checkpoint (nf4.fsdp): no rank ever holds the whole float model or the
whole 4-bit one. The LoRA adapters are plain FSDP2 parameters (sharded, gathered per layer, gradients
reduce-scattered); they start with the values a one-process run draws from the same seed.

The step is the one-process step: ``batch_size * grad_accum`` examples, split evenly over the ranks, the loss a sum
over all their tokens divided by the global token count. Layout of OUT, as nf4.train's plus the sharded state::

    OUT/checkpoint-<step>/    adapter_config.json, adapter_model.safetensors   the adapter (PEFT, written by rank 0)
                              distributed/              torch.distributed.checkpoint: adapters + AdamW moments
                              rng-<rank>.safetensors    each rank's RNG state (dropout)
                              trainer_state.json        as nf4.train's, with the world size
    OUT/adapter_*, OUT/trainer_state.json             the final adapter and history

``--resume`` reloads the sharded state and continues bit-for-bit as an uninterrupted run of the same world size.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from nf4 import fsdp, lora
from nf4 import train as qlora
from nf4.train import IGNORE, STATE_FILE, TrainArgs, TrainingError

DISTRIBUTED = "distributed"


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """fn's result on rank 0, sent to every rank; an error there is raised on every rank (none hangs)."""
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except (TrainingError, ValueError, OSError) as e:
            box[0] = ("error", f"{e}")
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise TrainingError(value)
    return value


# ---------------------------------------------------------------------------------------------------- model


def build_model(
    src: str | None, args: TrainArgs, device: torch.device, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """The sharded QLoRA model: skeleton, LoRA, ``fully_shard`` per decoder layer and root, this rank's rows read.

    ``compute_dtype`` (default bf16 on GPU, fp32 on CPU) is the dtype of the float tensors and of the 4-bit
    matmuls, as ``nf4 finetune`` loads the model.
    """
    world = dist.get_world_size()
    dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, reader = fsdp.load_model(src, world, dtype)
    lora.add_lora(model, args.lora_config())  # on meta: no memory, no random numbers drawn yet
    mesh = init_device_mesh(device.type, (world,))
    layer_types = tuple(getattr(model, "_no_split_modules", None) or ())
    for m in model.modules():
        if type(m).__name__ in layer_types:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fsdp.materialize(model, reader, device, dtype)
    init_lora(model, args.lora_config(), args.seed, device)
    if args.gradient_checkpointing:
        lora.enable_gradient_checkpointing(model)
    model.config.use_cache = False
    return model


def init_lora(model: nn.Module, config: lora.LoraConfig, seed: int, device: torch.device) -> None:
    """Give each rank its rows of the adapters that ``add_lora`` draws after ``torch.manual_seed(seed)`` on this
    device: each layer's adapter is made whole, by LoraLinear itself, on a weightless stand-in base, then sliced."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.lora_layers(model):
            stand_in = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
            shape = (layer.out_features, layer.in_features)
            stand_in.weight = nn.Parameter(torch.empty(1, device=device).expand(shape), requires_grad=False)
            whole = lora.LoraLinear(stand_in, config)
            for part in ("lora_A", "lora_B"):
                full = getattr(whole, part)[lora.ADAPTER_NAME].weight
                start, stop = fsdp.row_range(full.shape[0], rank, world)
                fsdp.local_tensor(getattr(layer, part)[lora.ADAPTER_NAME].weight).copy_(full[start:stop])


def memory_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per rank: bytes of its shard of the 4-bit base and of the whole base (the same on every rank)."""
    local, whole = fsdp.base_bytes(model)
    rows: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rows, {"rank": dist.get_rank(), "base_bytes": local, "whole_base_bytes": whole})
    return rows


# ------------------------------------------------------------------------------------------------ checkpoints

_OPTIONS = StateDictOptions(ignore_frozen_params=True)


def _peft_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter under PEFT's keys on rank 0 (every rank must call: it gathers); {} elsewhere."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(model, options=options)
    suffix = f".{lora.ADAPTER_NAME}.weight"
    return {f"{lora._PEFT_PREFIX}{k.removesuffix(suffix)}.weight": v.contiguous() for k, v in full.items()}


def write_adapter(folder: Path, model: nn.Module, base_name: str | None) -> None:
    """adapter_config.json + adapter_model.safetensors, PEFT's format, written once (rank 0); all ranks call."""
    tensors = _peft_tensors(model)
    if dist.get_rank() == 0:
        config = lora._peft_config(model, model.lora_config, base_name)
        (folder / lora.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(folder / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def save_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], base_name: str | None
) -> Path:
    """OUT/checkpoint-<step>: every rank writes into one temporary folder, then rank 0 renames it."""
    rank = dist.get_rank()
    final = out / f"checkpoint-{state['global_step']}"
    tmp = Path(_on_rank0(lambda: tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=out)))
    model_sd, optim_sd = get_state_dict(model, opt, options=_OPTIONS)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DISTRIBUTED))
    save_file(_rng_tensors(), str(tmp / f"rng-{rank}.safetensors"))
    write_adapter(tmp, model, base_name)
    dist.barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        lora.replace_dir(tmp, final)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Adapters, AdamW moments (resharded by DCP) and this rank's RNG state from a checkpoint folder."""
    model_sd, optim_sd = get_state_dict(model, opt, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / DISTRIBUTED))
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # the frozen base is not in it
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    with safe_open(str(folder / f"rng-{dist.get_rank()}.safetensors"), "pt") as f:
        torch.set_rng_state(f.get_tensor("rng.cpu"))
        if "rng.cuda" in f.keys() and torch.cuda.is_available():
            torch.cuda.set_rng_state(f.get_tensor("rng.cuda"))


# ------------------------------------------------------------------------------------------------------ train


def _local_norm(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def train(
    model: nn.Module,
    tokenizer: Any,
    examples: list[qlora.Example],
    out: Path,
    args: TrainArgs,
    start_ckpt: Path | None,
    base_name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """nf4.train.train on a sharded model: same data order, loss, clipping, schedule, checkpoints and log.

    Raises:
        TrainingError: a batch that does not split over the ranks, a resume with other settings, a NaN/Inf loss.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = next(p for p in model.parameters() if p.requires_grad).device
    per_step = args.batch_size * args.grad_accum
    per_rank = per_step // world
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_ex, eval_ex = qlora.split_eval(examples, args.seed, args.eval_examples) if args.eval_every else (examples, [])
    meta = {"args": asdict(args), "data_sha256": qlora._fingerprint(examples), "train_examples": len(train_ex)}
    meta["world_size"] = world
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step, log, tokens = 0, [], 0
    if start_ckpt is not None:
        saved = json.loads((start_ckpt / STATE_FILE).read_text())
        qlora._check_resume(saved["nf4"], meta, start_ckpt)
        if saved["nf4"].get("world_size") != world:
            raise TrainingError(
                f"{start_ckpt}: the run used {saved['nf4'].get('world_size')} ranks, this one {world}; "
                "resume with the same --nproc-per-node (each rank's RNG state is its own)"
            )
        load_checkpoint(start_ckpt, model, opt)
        step, log, tokens = saved["global_step"], saved["log_history"], saved["num_input_tokens_seen"]
    if step >= args.steps:
        raise TrainingError(f"{start_ckpt}: already at step {step}; pass a larger --steps to train further")
    if eval_ex and step == 0:
        log.append({"epoch": 0.0, "eval_loss": qlora.evaluate(model, eval_ex, args, pad_id, device), "step": 0})
    model.train()
    last_good = start_ckpt
    bar = qlora._Bar(progress and rank == 0, args.steps, step)
    state: dict[str, Any] = {}
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = qlora.lr_at(step, args)
            idx = [qlora.sample_index(step * per_step + j, len(train_ex), args.seed) for j in range(per_step)]
            n_tokens = sum(sum(t != IGNORE for t in train_ex[i].labels[1:]) for i in idx)
            mine = idx[rank * per_rank : (rank + 1) * per_rank]
            micro = [mine[j : j + args.batch_size] for j in range(0, per_rank, args.batch_size)]
            local = torch.zeros((), dtype=torch.float64, device=device)
            for j, chunk in enumerate(micro):
                model.set_requires_gradient_sync(j == len(micro) - 1)  # reduce-scatter once, after the last
                loss, _ = qlora.loss_sum(model, qlora.collate([train_ex[i] for i in chunk], pad_id, device))
                # FSDP2 averages gradients over the ranks: times world, it is the gradient of the global sum.
                (loss * world / max(n_tokens, 1)).backward()
                local += loss.detach().double()
            dist.all_reduce(local)
            step_loss = float(local)
            if not math.isfinite(step_loss):
                raise qlora._diverged(step + 1, f"loss is {step_loss}", last_good)
            grad_norm = _local_norm(nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise qlora._diverged(step + 1, f"gradient norm is {grad_norm}", last_good)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen = sum(len(train_ex[i].input_ids) for i in idx)
            tokens += seen
            entry = {
                "epoch": round(step * per_step / len(train_ex), 4),
                "grad_norm": grad_norm,
                "learning_rate": qlora.lr_at(step - 1, args),
                "loss": step_loss / max(n_tokens, 1),
                "step": step,
                "tokens_per_second": round(seen / (time.perf_counter() - t0), 1),
            }
            log.append(entry)
            if eval_ex and step % args.eval_every == 0:
                log.append(
                    {
                        "epoch": entry["epoch"],
                        "eval_loss": qlora.evaluate(model, eval_ex, args, pad_id, device),
                        "step": step,
                    }
                )
            state = qlora._trainer_state(step, log, args, entry["epoch"], tokens, meta)
            if args.save_every and (step % args.save_every == 0 or step == args.steps):
                last_good = save_checkpoint(out, model, opt, state, base_name)
                if rank == 0:
                    qlora._prune(out, args.keep_checkpoints)
            bar.update(loss=f"{entry['loss']:.4f}", mem=f"{qlora.memory_mib(device):.0f}MiB")
    finally:
        bar.close()
    write_adapter(out, model, base_name)
    if rank == 0:
        qlora._write_json(out / STATE_FILE, state)
    dist.barrier()
    return state


def finetune(
    model_src: str | None,
    data: list[str] | None,
    out: str | Path,
    args: TrainArgs,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = print,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """``nf4 finetune --fsdp`` on every rank of a torchrun job: check, load this rank's shard, train, save.

    Returns:
        The final trainer state, plus ``memory``: each rank's bytes of the 4-bit base.
    """
    from nf4 import checkpoint

    args.check()
    _, world, device = fsdp.init_distributed(timeout_s)
    try:
        per_step = args.batch_size * args.grad_accum
        if per_step % world:
            raise TrainingError(
                f"--batch-size x --grad-accum = {per_step} examples a step do not split over {world} ranks; "
                "make it a multiple of --nproc-per-node"
            )
        out = Path(out)
        start_ckpt = _on_rank0(lambda: qlora.prepare_out(out, resume))
        tokenizer = checkpoint.load_tokenizer(model_src)
        examples = qlora.load_examples(data, tokenizer, args.seq_len, args.skip_bad_lines)
        model = build_model(model_src, args, device)
        max_len = getattr(model.config, "max_position_embeddings", None)
        if max_len is not None and args.seq_len > max_len:
            raise TrainingError(f"--seq-len {args.seq_len} is above the model's maximum of {max_len} positions")
        memory = memory_report(model)
        for row in memory if dist.get_rank() == 0 else []:
            share = row["base_bytes"] / max(row["whole_base_bytes"], 1)
            log(
                f"rank {row['rank']}/{world}: 4-bit base {row['base_bytes'] / 2**20:.1f} MiB of "
                f"{row['whole_base_bytes'] / 2**20:.1f} MiB ({share:.1%}; 1/{world} = {1 / world:.1%})"
            )
        name = None if model_src is None else str(model_src)
        return train(model, tokenizer, examples, out, args, start_ckpt, name, progress) | {"memory": memory}
    finally:
        dist.destroy_process_group()


def run_cli(ns: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """``nf4 finetune --fsdp``: the flags of ``nf4 finetune`` over TrainArgs, then ``finetune`` on this rank."""
    if ns.demo:
        raise TrainingError("--demo runs in one process; it takes no --fsdp")
    args = qlora.args_from_cli(ns, TrainArgs())
    model, data = qlora._split_paths(ns.paths)
    quiet = (lambda s: None) if ns.json else log
    state = finetune(model, data or None, ns.out, args, ns.resume, not ns.json, quiet, ns.fsdp_timeout)
    return qlora.cli_summary(ns, state) | {"memory": state["memory"]}
