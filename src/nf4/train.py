"""QLoRA fine-tuning: LoRA adapters on a frozen NF4 base, with exact resume and PEFT-format output.

Layout of OUT (Hugging Face Trainer's, so its tools read it)::

    OUT/checkpoint-<step>/    adapter_config.json, adapter_model.safetensors   the adapter (PEFT format)
                              optimizer.safetensors   AdamW moments + torch RNG state (no pickle)
                              trainer_state.json      log_history, global_step, and "nf4": the run's settings
    OUT/adapter_*, OUT/trainer_state.json             the final adapter and history

Each checkpoint is written into a temporary folder and renamed, so a kill at any moment leaves the last complete
one. Resuming restores the adapter, the optimizer, the RNG and the data position (a pure function of the step),
so a killed-and-resumed run ends with the same adapter bytes as an uninterrupted one.

Data: JSONL lines ``{"text": ...}`` (packed into blocks of ``seq_len``) or ``{"prompt": ..., "response": ...}``
(one example each, loss on the response only, as QLoRA), or plain text files (packed). The default is the
license texts in ``/usr/share/common-licenses`` (see docs/QLORA.md for why).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nf4 import fused, lora

DEFAULT_DATA = Path("/usr/share/common-licenses")
IGNORE = -100  # label of tokens without loss (prompt, padding), as transformers
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "trainer_state.json"
# Settings that must not change on --resume: each one changes the numbers a step computes.
_FIXED_ON_RESUME = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "lr",
    "batch_size",
    "grad_accum",
    "seq_len",
    "seed",
    "weight_decay",
    "max_grad_norm",
    "adapter_dtype",
    "gradient_checkpointing",
    "fused",
)


class TrainingError(ValueError):
    """Bad data, settings or output folder, or a diverged run: the message says what and where."""


@dataclass
class TrainArgs:
    """QLoRA's defaults (Dettmers et al. 2023): r 64, alpha 16, dropout 0.05, lr 2e-4 constant after 3% warmup,
    AdamW, max grad norm 0.3; bf16 compute on GPU."""

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 4
    seq_len: int = 512
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    adapter_dtype: str = "float32"
    seed: int = 42
    eval_every: int = 0
    eval_examples: int = 256  # at most this many held-out examples (5% of the data) for --eval-every
    save_every: int = 50
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = True
    skip_bad_lines: bool = False
    fused: bool | None = None  # nf4.fused's fast steps: None where they pay (CUDA), True to insist, False off
    compile: bool = False  # torch.compile each decoder layer (nf4.fused "compile"): faster, tens of seconds to start

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise TrainingError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise TrainingError(f"--seq-len must be >= 2 (one token predicts the next), got {self.seq_len}")
        if self.adapter_dtype not in ("float32", "bfloat16"):
            raise TrainingError(f"adapter dtype must be float32 or bfloat16, got {self.adapter_dtype!r}")

    def lora_config(self) -> lora.LoraConfig:
        return lora.LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.target_modules,
            dtype=getattr(torch, self.adapter_dtype),
        )


# --------------------------------------------------------------------------------------------------- data


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss


def _data_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named, or every file under a named folder (sorted), each once (symlinks resolved)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise TrainingError(f"{p}: no such data file or folder")
    seen, unique = set(), []
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def read_records(paths: Sequence[str | os.PathLike], skip_bad_lines: bool = False) -> list[dict[str, str]]:
    """Records ``{"text"}`` or ``{"prompt", "response"}`` from JSONL files (``.jsonl``) and plain text files.

    Raises:
        TrainingError: a malformed JSONL line (file and line number), unless ``skip_bad_lines`` (then a warning).
    """
    records: list[dict[str, str]] = []
    for path in _data_files(paths):
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TrainingError(f"{path}: not UTF-8 text ({e})") from e
        if path.suffix != ".jsonl":
            if raw.strip():
                records.append({"text": raw})
            continue
        bad = 0
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            problem = None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    records.append({"text": obj["text"]})
                elif (
                    isinstance(obj, dict)
                    and isinstance(obj.get("prompt"), str)
                    and isinstance(obj.get("response"), str)
                ):
                    records.append({"prompt": obj["prompt"], "response": obj["response"]})
                else:
                    problem = 'expected an object with a string "text", or string "prompt" and "response"'
            if problem:
                if not skip_bad_lines:
                    raise TrainingError(f"{path}:{lineno}: {problem} (pass --skip-bad-lines to skip such lines)")
                bad += 1
        if bad:
            warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    return records


def tokenize(records: list[dict[str, str]], tokenizer: Any, seq_len: int) -> list[Example]:
    """Texts packed into blocks of ``seq_len`` (EOS between documents); each prompt/response pair one example.

    A pair is formatted with the tokenizer's chat template when it has one (as ``nf4 generate`` prompts),
    the loss is on the response and EOS only, and it is truncated to ``seq_len``.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    examples: list[Example] = []
    dropped = 0
    for rec in records:
        if "text" in rec:
            stream += tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            continue
        prompt = rec["prompt"]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids, labels = (p + r)[:seq_len], ([IGNORE] * len(p) + r)[:seq_len]
        if all(t == IGNORE for t in labels[1:]):
            dropped += 1  # the prompt fills the window: nothing to learn
            continue
        examples.append(Example(ids, labels))
    for start in range(0, len(stream), seq_len):
        block = stream[start : start + seq_len]
        if len(block) >= 2:
            examples.append(Example(block, list(block)))
    if dropped:
        warnings.warn(f"dropped {dropped} prompt/response pair(s) whose prompt fills --seq-len {seq_len}", stacklevel=2)
    return examples


def load_examples(
    paths: Sequence[str | os.PathLike] | None, tokenizer: Any, seq_len: int, skip_bad_lines: bool = False
) -> list[Example]:
    """Read and tokenize the data (default: the license texts); an empty result is an error."""
    if not paths:
        if not DEFAULT_DATA.is_dir():
            raise TrainingError(f"no DATA given and the default {DEFAULT_DATA} is missing; pass a JSONL or text file")
        paths = [DEFAULT_DATA]
    examples = tokenize(read_records(paths, skip_bad_lines), tokenizer, seq_len)
    if not examples:
        raise TrainingError(f"no training examples in {', '.join(map(str, paths))} (empty files or only blank lines)")
    return examples


def _fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(torch.tensor(ex.input_ids + [-1] + ex.labels, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def split_eval(
    examples: list[Example], seed: int, limit: int = 256, fraction: float = 0.05
) -> tuple[list[Example], list[Example]]:
    """(train, eval): a seeded ``fraction`` (at most ``limit``) held out for --eval-every (none below 2 examples)."""
    if len(examples) < 2:
        return examples, []
    n_eval = max(1, min(limit, int(len(examples) * fraction)))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def sample_index(i: int, n: int, seed: int) -> int:
    """The example at position ``i`` of the run: epoch ``i // n`` is a seeded permutation. Pure, so resumable."""
    epoch, k = divmod(i, n)
    return int(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[k])


def collate(batch: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` [B, S]."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# -------------------------------------------------------------------------------------------------- steps


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies in fp32, number of predicted tokens) of one micro-batch."""
    if "loss" in getattr(model, "nf4_fused", ()):  # liger's fused linear cross-entropy: no logits
        return fused.loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"], IGNORE)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


def lr_at(step: int, args: TrainArgs) -> float:
    """transformers' constant_with_warmup: linear from 0 over ceil(warmup_ratio * steps) steps, then constant."""
    warmup = math.ceil(args.steps * args.warmup_ratio)
    return args.lr * (step / warmup if step < warmup else 1.0)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], args: TrainArgs, pad_id: int, device: torch.device) -> float:
    """Mean token loss over ``examples`` (dropout off; uses no RNG, so it does not disturb resume)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), args.batch_size):
        loss, n = loss_sum(model, collate(examples[start : start + args.batch_size], pad_id, device))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


# -------------------------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, sd["param_groups"]


def _restore_optimizer(opt: torch.optim.Optimizer, folder: Path, groups: list[dict[str, Any]]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(folder / OPTIMIZER_FILE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, t in tensors.items():
        if key.startswith("state."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _trainer_state(
    step: int, log: list[dict[str, Any]], args: TrainArgs, epoch: float, tokens: int, nf4_meta: dict[str, Any]
) -> dict[str, Any]:
    """transformers' TrainerState fields, plus our own under "nf4"."""
    return {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epoch,
        "eval_steps": args.eval_every or None,
        "global_step": step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log,
        "logging_steps": 1,
        "max_steps": args.steps,
        "num_input_tokens_seen": tokens,
        "num_train_epochs": math.ceil(epoch) or 1,
        "save_steps": args.save_every,
        "stateful_callbacks": {},
        "total_flos": 0.0,
        "train_batch_size": args.batch_size,
        "trial_name": None,
        "trial_params": None,
        "nf4": nf4_meta,
    }


def save_checkpoint(
    out: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], base_name: str | None
) -> Path:
    """OUT/checkpoint-<step>: written complete into a temporary folder, then renamed."""
    final = out / f"checkpoint-{state['global_step']}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=out))
    try:
        lora.write_adapter(tmp, model, base_name)
        tensors, groups = _optimizer_tensors(opt)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        state = state | {"nf4": state["nf4"] | {"param_groups": groups}}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        lora.replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first (temporary folders of a killed run are not listed)."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("-", 1)[1]))


def _prune(out: Path, keep: int) -> None:
    for old in checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    for tmp in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's half-written checkpoint


def prepare_out(out: Path, resume: bool) -> Path | None:
    """Check OUT before any slow work; return the checkpoint to resume from (None: a fresh run).

    A fresh run needs OUT absent or empty (nothing is ever overwritten); --resume needs a checkpoint in it.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".nf4-write-test."):
            pass
    except OSError as e:
        raise TrainingError(f"{out}: cannot write the output folder ({e.strerror or e})") from e
    found = checkpoints(out)
    if resume:
        if not found:
            raise TrainingError(f"{out}: --resume given but there is no checkpoint-<step> folder to resume from")
        return found[-1]
    if any(p for p in out.iterdir() if not p.name.startswith(".nf4-write-test.")):
        raise TrainingError(f"{out}: not empty; pass --resume to continue its run, or choose a new folder")
    return None


# ---------------------------------------------------------------------------------------------- progress


def memory_mib(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Bar:
    """A tqdm bar on stderr when asked for and installed; otherwise nothing."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ModuleNotFoundError:
                return
            self.bar = tqdm(total=total, initial=initial, desc="finetune", unit="step", file=sys.stderr)

    def update(self, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------- train


def train(
    model: nn.Module,
    tokenizer: Any,
    examples: list[Example],
    out: str | os.PathLike,
    args: TrainArgs,
    resume: bool = False,
    base_name: str | None = None,
    progress: bool = False,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on ``model`` (LinearNF4 layers, frozen) and save them in PEFT's format to ``out``.

    Args:
        examples: from ``load_examples``; 5% are held out for evaluation when ``args.eval_every`` > 0.
        resume: continue from the last checkpoint in ``out``, bit-identically.
        callback: called after every optimizer step with ``(step, log entry)``.

    Returns:
        The final trainer state (``log_history`` etc.); the adapter is in ``out``.

    Raises:
        TrainingError: bad settings or OUT, a resume with other settings or data, or a NaN/Inf loss (the run
            stops; the last good checkpoint stays).
    """
    args.check()
    out = Path(out)
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len is not None and args.seq_len > max_len:
        raise TrainingError(f"--seq-len {args.seq_len} is above the model's maximum of {max_len} positions")
    start_ckpt = prepare_out(out, resume)
    device = next(model.buffers()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    train_ex, eval_ex = split_eval(examples, args.seed, args.eval_examples) if args.eval_every else (examples, [])
    meta = {"args": asdict(args), "data_sha256": _fingerprint(examples), "train_examples": len(train_ex)}

    torch.manual_seed(args.seed)
    if not any(True for _ in lora.lora_layers(model)):  # a model given with fresh adapters keeps them
        lora.add_lora(model, args.lora_config())
    if args.gradient_checkpointing:
        lora.enable_gradient_checkpointing(model)
    try:
        fused.enable(model, fused.default_steps(model, args.fused, compile=args.compile))
    except ValueError as e:
        raise TrainingError(str(e)) from e
    params = lora.lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step, log, tokens = 0, [], 0
    if start_ckpt is not None:
        saved = json.loads((start_ckpt / STATE_FILE).read_text())
        _check_resume(saved["nf4"], meta, start_ckpt)
        lora.load_adapter_weights(model, lora.read_adapter_weights(start_ckpt), str(start_ckpt))
        _restore_optimizer(opt, start_ckpt, saved["nf4"]["param_groups"])
        step, log, tokens = saved["global_step"], saved["log_history"], saved["num_input_tokens_seen"]
    if step >= args.steps:
        raise TrainingError(f"{start_ckpt}: already at step {step}; pass a larger --steps to train further")

    if eval_ex and step == 0:  # as transformers' eval_on_start: the baseline the eval losses fall from
        log.append({"epoch": 0.0, "eval_loss": evaluate(model, eval_ex, args, pad_id, device), "step": 0})
    model.train()
    per_step = args.batch_size * args.grad_accum
    last_good = start_ckpt
    bar = _Bar(progress, args.steps, step)
    try:
        while step < args.steps:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args)
            first = step * per_step
            idx = [sample_index(first + j, len(train_ex), args.seed) for j in range(per_step)]
            micro = [idx[j : j + args.batch_size] for j in range(0, per_step, args.batch_size)]
            n_tokens = sum(sum(t != IGNORE for t in train_ex[i].labels[1:]) for i in idx)
            step_loss = 0.0
            for chunk in micro:
                loss, _ = loss_sum(model, collate([train_ex[i] for i in chunk], pad_id, device))
                if not torch.isfinite(loss):
                    raise _diverged(step + 1, f"loss is {loss.item()}", last_good)
                (loss / max(n_tokens, 1)).backward()
                step_loss += loss.item()
            grad_norm = float(nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise _diverged(step + 1, f"gradient norm is {grad_norm}", last_good)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen = sum(len(train_ex[i].input_ids) for i in idx)
            tokens += seen
            dt = time.perf_counter() - t0
            entry = {
                "epoch": round(step * per_step / len(train_ex), 4),
                "grad_norm": grad_norm,
                "learning_rate": lr_at(step - 1, args),
                "loss": step_loss / max(n_tokens, 1),
                "step": step,
                "tokens_per_second": round(seen / dt, 1),
            }
            log.append(entry)
            if eval_ex and step % args.eval_every == 0:
                log.append(
                    {"epoch": entry["epoch"], "eval_loss": evaluate(model, eval_ex, args, pad_id, device), "step": step}
                )
            state = _trainer_state(step, log, args, entry["epoch"], tokens, meta)
            if args.save_every and (step % args.save_every == 0 or step == args.steps):
                last_good = save_checkpoint(out, model, opt, state, base_name)
                _prune(out, args.keep_checkpoints)
            bar.update(
                loss=f"{entry['loss']:.4f}",
                tok_s=f"{entry['tokens_per_second']:.0f}",
                mem=f"{memory_mib(device):.0f}MiB",
            )
            if callback is not None:
                callback(step, entry)
    finally:
        bar.close()
    lora.write_adapter(out, model, base_name)  # the final adapter beside the checkpoints
    _write_json(out / STATE_FILE, state)
    return state


def _diverged(step: int, what: str, last_good: Path | None) -> TrainingError:
    keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
    return TrainingError(f"step {step}: {what}; training stopped ({keep}). Lower --lr or check the data.")


def _check_resume(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    for key in _FIXED_ON_RESUME:
        if saved["args"].get(key) != now["args"].get(key):
            raise TrainingError(
                f"{where}: cannot resume with {key}={now['args'].get(key)!r}; the run used "
                f"{saved['args'].get(key)!r} (only --steps, --eval-every, --save-every may change)"
            )
    if saved["data_sha256"] != now["data_sha256"]:
        raise TrainingError(
            f"{where}: the data differs from the run's (sha256 of its tokens); resume with the same data"
        )


# ---------------------------------------------------------------------------------------------- front door


def load_model(src: str | os.PathLike | None, device: torch.device | None = None) -> tuple[nn.Module, Any]:
    """(model with LinearNF4 layers on ``device``, tokenizer): bf16 on GPU, fp32 on CPU."""
    from nf4 import checkpoint

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = checkpoint.from_pretrained(src, dtype=dtype, compute_dtype=dtype)
    return model.to(device), checkpoint.load_tokenizer(src)


def finetune(
    model_src: str | os.PathLike | None,
    data: Sequence[str | os.PathLike] | None,
    out: str | os.PathLike,
    args: TrainArgs | None = None,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load MODEL (HF folder, GGUF or nf4 checkpoint; None: the embedded SmolLM2) and DATA, then ``train``.

    OUT and the settings are checked before the model is loaded, so bad input fails fast and writes nothing.
    """
    args = args or TrainArgs()
    args.check()
    prepare_out(Path(out), resume)
    model, tokenizer = load_model(model_src)
    examples = load_examples(data, tokenizer, args.seq_len, args.skip_bad_lines)
    name = None if model_src is None else str(model_src)
    return train(model, tokenizer, examples, out, args, resume, name, progress, callback)


def generate_text(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 16) -> str:
    """Greedy continuation of ``prompt`` (chat-formatted when the tokenizer has a template)."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.buffers()).device)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        ids = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    model.train(was_training)
    return tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


DEMO_PROMPT = "What does the GNU General Public License say about warranty?"
# On CPU a step's cost is mostly dequantizing the 4-bit weights (once forward, once backward), whatever the batch:
# few steps of a wider batch. Generation dequantizes every layer per token: short generations.
DEMO_ARGS = TrainArgs(
    steps=10,
    batch_size=8,
    grad_accum=1,
    seq_len=64,
    eval_examples=8,
    lr=1e-3,
    r=16,
    lora_alpha=32,
    save_every=5,
    eval_every=5,
    gradient_checkpointing=False,
)


def demo(out: str | os.PathLike, log: Callable[[str], None], args: TrainArgs | None = None) -> dict[str, Any]:
    """``nf4 finetune --demo``: the embedded SmolLM2 on the license texts, a few minutes on CPU; generations
    before and after. ``log`` receives the lines to show."""
    args = args or DEMO_ARGS
    args.check()
    prepare_out(Path(out), False)
    model, tokenizer = load_model(None)
    examples = load_examples(None, tokenizer, args.seq_len)
    log(f"data: {len(examples)} blocks of <= {args.seq_len} tokens from {DEFAULT_DATA}")
    torch.manual_seed(args.seed)
    lora.add_lora(model, args.lora_config())  # B = 0: the base model's outputs, through LoRA's faster CPU path
    before = generate_text(model, tokenizer, DEMO_PROMPT)
    log(f"prompt: {DEMO_PROMPT}\nbefore: {before}")
    state = train(model, tokenizer, examples, out, args, progress=True)
    after = generate_text(model, tokenizer, DEMO_PROMPT)
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    log(f"train loss: {' '.join(f'{x:.2f}' for x in _every(losses, 5))}")
    if evals:
        log(f"eval loss: {' '.join(f'{x:.3f}' for x in evals)}")
    log(f"after: {after}")
    return {"before": before, "after": after, "losses": losses, "eval_losses": evals, "out": str(out)}


def _every(xs: Iterable[float], k: int) -> list[float]:
    xs = list(xs)
    return xs[::k] + ([xs[-1]] if (len(xs) - 1) % k else [])


# ------------------------------------------------------------------------------------------------- merge


def merge(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    requantize: bool = False,
) -> Path:
    """Fold a LoRA adapter into its base and save a float HF folder (or, ``requantize``, an NF4 checkpoint).

    The adapter is added to the base exactly as it was trained: the NF4 base dequantized in fp32, plus
    ``scaling * B @ A``, rounded once to ``dtype``. Re-quantizing rounds the merged weights to 4 bits again,
    which loses part of the update (a warning says so).

    Raises:
        AdapterError: the adapter does not fit the base. CheckpointError: OUT exists, or a bad BASE.
    """
    from nf4 import checkpoint
    from nf4.nn import quantize_model

    out = Path(out)
    checkpoint.check_writable(out)
    lora.read_adapter_config(adapter)  # fail before the slow load
    model = checkpoint.from_pretrained(base)
    lora.load_adapter(model, adapter)
    lora.dequantize_model(lora.merge_lora(model, torch.float32))  # layers without an adapter too
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = checkpoint.load_tokenizer(base) if checkpoint.has_tokenizer(base) else None
    if requantize:
        warnings.warn(
            "re-quantizing the merged model rounds the LoRA update into 4-bit blocks; its outputs differ "
            "from base + adapter (keep the adapter, or merge to bf16, for the exact model)",
            stacklevel=2,
        )
        return checkpoint.save_pretrained(quantize_model(model), out, tokenizer=tokenizer)
    model.to(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        checkpoint.check_writable(out)
        lora.replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(sub: Any, common: Any) -> None:
    """The ``finetune`` and ``merge`` subcommands (defaults None: filled from TrainArgs or the demo's)."""
    f = sub.add_parser("finetune", parents=[common], help="QLoRA: train LoRA adapters on a frozen NF4 model")
    f.add_argument(
        "paths",
        nargs="*",
        metavar="[MODEL] [DATA]",
        help="MODEL: HF folder, .gguf or nf4 checkpoint (default: embedded SmolLM2); DATA: .jsonl "
        f"(text, or prompt/response) or text files/folders (default: {DEFAULT_DATA})",
    )
    f.add_argument("--out", required=True, help="output folder (checkpoints, adapter, trainer_state.json)")
    f.add_argument(
        "--demo",
        action="store_true",
        help="embedded SmolLM2 on the default data, small settings; generations before and after",
    )
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT, bit-identically")
    f.add_argument("--skip-bad-lines", action="store_true", help="skip malformed JSONL lines instead of stopping")
    f.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
    f.add_argument("--fused", action="store_true", default=None, help="insist on the fused GPU path (nf4.fused)")
    f.add_argument("--no-fused", dest="fused", action="store_false", help="the plain path (default off CUDA)")
    f.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile each decoder layer: 2.2x HF+PEFT+bnb's tokens/s at 0.48x its memory on an H200 "
        "(1.1B Llama); the first step compiles (15-25 s)",
    )
    f.add_argument("--target-modules", nargs="+", help="layer names, or all-linear (default; lm_head excluded)")
    for name, typ in [
        ("steps", int),
        ("batch_size", int),
        ("grad_accum", int),
        ("seq_len", int),
        ("lr", float),
        ("r", int),
        ("lora_alpha", float),
        ("lora_dropout", float),
        ("seed", int),
        ("eval_every", int),
        ("save_every", int),
        ("max_grad_norm", float),
        ("warmup_ratio", float),
        ("adapter_dtype", str),
    ]:
        f.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=typ,
            default=None,
            help=f"default {getattr(TrainArgs(), name)}",
        )

    m = sub.add_parser("merge", parents=[common], help="fold a LoRA adapter into its base model")
    m.add_argument("base", help="the base: HF folder, .gguf or nf4 checkpoint")
    m.add_argument("adapter", help="the adapter folder (PEFT format)")
    m.add_argument("out", help="output folder (must not exist or be empty)")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="float dtype of the merged model")
    m.add_argument("--requantize", action="store_true", help="save NF4 instead (rounds the merged weights: warns)")


def _split_paths(paths: list[str]) -> tuple[str | None, list[str]]:
    """[MODEL] [DATA...]: the first path is MODEL when it is a .gguf file or a folder with config.json."""
    if paths and (paths[0].endswith(".gguf") or (Path(paths[0]) / "config.json").is_file()):
        return paths[0], paths[1:]
    return None, paths


def args_from_cli(ns: Any, base: TrainArgs) -> TrainArgs:
    """``nf4 finetune``'s flags over ``base``: the flags given win (shared by the one-process and --fsdp paths)."""
    import dataclasses

    overrides = {k: getattr(ns, k) for k in asdict(base) if getattr(ns, k, None) is not None}
    if ns.target_modules:
        overrides["target_modules"] = "all-linear" if ns.target_modules == ["all-linear"] else ns.target_modules
    if ns.skip_bad_lines:
        overrides["skip_bad_lines"] = True
    return dataclasses.replace(base, **overrides)


def cli_summary(ns: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The JSON ``nf4 finetune`` prints: the loss history and where the adapter went."""
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    msg = f"step {state['global_step']}: loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote the adapter to {ns.out}"
    return {"out": str(ns.out), "global_step": state["global_step"], "losses": losses, "message": msg}


def run_cli(ns: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """``nf4 finetune``: settings from the flags over TrainArgs (or the demo's), then ``finetune`` or ``demo``."""
    import dataclasses

    args = args_from_cli(ns, dataclasses.replace(DEMO_ARGS) if ns.demo else TrainArgs())
    if ns.demo:
        if ns.paths or ns.resume:
            raise TrainingError("--demo uses the embedded model and data; it takes no MODEL, DATA or --resume")
        result = demo(ns.out, (lambda s: None) if ns.json else log, args)
        return result | {"message": f"wrote the adapter to {ns.out}"}
    model, data = _split_paths(ns.paths)
    state = finetune(model, data or None, ns.out, args, resume=ns.resume, progress=not ns.json)
    return cli_summary(ns, state)


def merge_cli(ns: Any) -> dict[str, Any]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[ns.dtype]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = merge(ns.base, ns.adapter, ns.out, dtype, ns.requantize)
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for note in notes:
        warnings.warn(note, stacklevel=1)  # re-raised so that the CLI shows them on stderr
    kind = "NF4 (re-quantized)" if ns.requantize else ns.dtype
    return {"out": str(path), "warnings": notes, "message": f"wrote the merged model ({kind}) to {path}"}
