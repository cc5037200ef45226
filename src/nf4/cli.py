"""The ``nf4`` command: quantize a model to a transformers + bitsandbytes 4-bit folder, inspect one, generate text.

    nf4 quantize [SRC] OUT [--quant-type nf4|fp4|nf4-search] [--blocksize 64] [--no-double-quant] [--skip lm_head]
    nf4 inspect CKPT
    nf4 generate CKPT --prompt "..." [--max-new-tokens 64] [--temperature 0] [--top-p 1] [--adapter DIR] [--fuse]
                 [--device auto|cpu|cuda[:N]] [--compile]
    nf4 finetune [MODEL] [DATA...] --out DIR [--steps N] [--resume] [--demo]   (QLoRA; see docs/QLORA.md)
    torchrun --nproc-per-node N -m nf4.cli finetune [MODEL] [DATA...] --out DIR --fsdp   (see docs/FSDP.md)
    nf4 merge BASE ADAPTER OUT [--dtype bf16 | --requantize]
    nf4 eval [MODEL] [--formats nf4,fp4,...] [--blocksizes 64] [--text FILE] [--json [OUT]] [--plots DIR]

SRC is a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct). Bad input exits
with status 1 and one line on stderr; nothing is written to OUT.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from nf4 import checkpoint, evaluate, nn
from nf4.format import BLOCKSIZES, FormatError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _progress(enabled: bool) -> checkpoint.Progress | None:
    """tqdm bars on stderr when tqdm is installed and a person watches (a terminal, no --json)."""
    if not (enabled and sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None

    def bar(items: list[T], desc: str) -> Iterable[T]:
        return tqdm(items, desc=desc, unit="tensor", leave=False, file=sys.stderr)

    return bar


def _quantize(args: argparse.Namespace) -> dict[str, Any]:
    if len(args.paths) > 2:
        raise ValueError(f"quantize takes [SRC] OUT, got {len(args.paths)} paths")
    src, out = (None, args.paths[0]) if len(args.paths) == 1 else args.paths
    start = time.perf_counter()
    checkpoint.check_writable(out, args.overwrite)  # fail before the slow part
    # The tokenizer first: parsing a GGUF's tokenizer tables peaks at ~150 MiB, freed before the weights come in.
    tokenizer = checkpoint.load_tokenizer(src) if checkpoint.has_tokenizer(src) else None
    model = checkpoint.from_pretrained(
        src,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        double_quant=args.double_quant,
        skip=args.skip,
        progress=_progress(not args.json),
    )
    path = checkpoint.save_pretrained(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    rows = checkpoint.describe(path)
    return {
        "src": str(src or checkpoint.default_gguf()),
        "out": str(path),
        "seconds": round(time.perf_counter() - start, 2),
        **_totals(rows),
    }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    params = sum(r["numel"] for r in rows)
    size = sum(r["bytes"] for r in rows)
    return {"params": params, "bytes": size, "bf16_bytes": 2 * params, "vs_bf16": round(size / (2 * params), 4)}


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    rows = checkpoint.describe(args.ckpt)
    return {"tensors": rows, "totals": _totals(rows)}


def _device(name: str) -> torch.device:
    """--device: auto is the first GPU when there is one."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: nf4 runs on cpu or cuda")
    return device


_COMPILE_NEEDS_CUDA = "--compile captures the decode step in CUDA graphs: it needs a CUDA device"


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    compiled: bool = False,
) -> dict[str, Any]:
    """Generate from ``prompt`` (through the tokenizer's chat template when it has one) on the model's device.

    compiled: nf4.decode's loop (a static KV cache, the one-token step compiled and replayed as CUDA graphs, the
    next token chosen on the device) instead of transformers' ``generate``. A first generation of the same length,
    stopped after a few tokens, pays the compile and the graph capture; it is timed apart (compile_s).
    """
    import torch

    device = next(model.parameters()).device
    if compiled and device.type != "cuda":
        raise ValueError(_COMPILE_NEEDS_CUDA)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt").to(device)
    prompt_len = inputs["input_ids"].shape[1]

    def timed(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - start

    compile_s = None
    if compiled:
        from nf4.decode import Decoder

        decoder = Decoder(model, prompt_len + max_new_tokens, compiled=True)
        eos = _ids(model.generation_config.eos_token_id)  # what transformers' generate stops at
        choice = dict(temperature=temperature, top_p=top_p, eos_token_ids=eos)
        # the warm-up: the prefill, then a compile, a recording and replays
        compile_s = timed(lambda: decoder.generate(inputs["input_ids"], max_new_tokens, **choice, stop_after=4))[1]
        out, seconds = timed(lambda: decoder.generate(inputs["input_ids"], max_new_tokens, **choice))
    else:
        sample = temperature > 0
        options = dict(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        out, seconds = timed(lambda: model.generate(**inputs, **options))
    new = out[0, prompt_len:]
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new.numel() / seconds, 2),
        "device": str(device),
        "compile_s": None if compile_s is None else round(compile_s, 2),
    }


def _ids(value: int | list[int] | None) -> list[int]:
    """A generation config's token id field (one id, a list of them or none) as a list."""
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = _device(args.device)
    if args.compile and device.type != "cuda":
        raise ValueError(_COMPILE_NEEDS_CUDA)
    dtype = torch.bfloat16 if device.type == "cuda" else None  # embeddings, norms and skipped layers too
    model = checkpoint.from_pretrained(args.ckpt, dtype=dtype, progress=_progress(not args.json))
    if args.adapter:
        from nf4 import lora

        lora.load_adapter(model, args.adapter)
    fused = nn.fuse_projections(model) if args.fuse else 0
    model.to(device)
    tokenizer = checkpoint.load_tokenizer(args.ckpt)
    result = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, args.compile)
    return result | {"fused_groups": fused}


def _finetune(args: argparse.Namespace) -> dict[str, Any]:
    from nf4 import train

    if args.fsdp:
        from nf4 import fsdp_train

        return fsdp_train.run_cli(args, log=print)
    return train.run_cli(args, log=print)


def _merge(args: argparse.Namespace) -> dict[str, Any]:
    from nf4 import train

    return train.merge_cli(args)


def _finetune_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from nf4.train import add_arguments

    add_arguments(sub, common)
    f = sub.choices["finetune"]
    f.add_argument("--fsdp", action="store_true", help="shard over the ranks of a torchrun job (docs/FSDP.md)")
    f.add_argument("--fsdp-timeout", type=float, default=600.0, help="seconds a rank waits for the others (--fsdp)")


def _print_human(command: str, result: dict[str, Any]) -> None:
    mib = 1 << 20
    if command == "inspect":
        print(f"{'tensor':<58} {'shape':>14} {'format':>12} {'bits/param':>10} {'bytes':>12}")
        for r in result["tensors"]:
            shape = "x".join(map(str, r["shape"]))
            print(f"{r['name']:<58} {shape:>14} {r['format']:>12} {r['bits_per_param']:>10.3f} {r['bytes']:>12,}")
    if command in ("inspect", "quantize"):
        t = result.get("totals", result)
        print(
            f"total: {t['params']:,} params, {t['bytes'] / mib:.1f} MiB "
            f"({8 * t['bytes'] / t['params']:.3f} bits/param), {t['vs_bf16']:.1%} of bf16 "
            f"({t['bf16_bytes'] / mib:.1f} MiB)"
        )
    if command == "quantize":
        print(f"wrote {result['out']} in {result['seconds']} s")
    if command in ("finetune", "merge"):
        print(result["message"])
    if command == "eval":
        print(evaluate.format_table(result))
    if command == "generate":
        print(result["text"])
        compiled = f"; compile {result['compile_s']} s before" if result["compile_s"] is not None else ""
        print(f"[{result['new_tokens']} tokens in {result['seconds']} s: {result['tokens_per_s']} tokens/s on "
              f"{result['device']}{compiled}]")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nf4", description="NF4 (4-bit NormalFloat) models, bitsandbytes-compatible.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of text and progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common], help="quantize a HF folder or a .gguf file to a 4-bit folder")
    q.add_argument("paths", nargs="+", metavar="[SRC] OUT", help="source (default: embedded SmolLM2) and output folder")
    q.add_argument("--quant-type", choices=checkpoint.QUANT_TYPES, default="nf4")
    q.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64)
    q.add_argument("--no-double-quant", dest="double_quant", action="store_false", help="keep absmax in fp32")
    q.add_argument("--skip", nargs="*", default=["lm_head"], help="Linear layers kept in float (default: lm_head)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    i = sub.add_parser(
        "inspect", parents=[common], help="per tensor: shape, format, bits/param, bytes; totals against bf16"
    )
    i.add_argument("ckpt")

    g = sub.add_parser("generate", parents=[common], help="generate text with the model's own tokenizer")
    g.add_argument("ckpt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--adapter", help="a LoRA adapter folder (PEFT format, e.g. from nf4 finetune) to apply")
    g.add_argument(
        "--fuse",
        action="store_true",
        help="one matmul for q/k/v and one for gate/up: fewer launches (double-quant absmax re-encoded once)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default auto: a GPU when there is one)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="CUDA only: static KV cache and a compiled, CUDA-graphed decode step (compile time reported apart)",
    )
    _finetune_parsers(sub, common)
    evaluate.add_arguments(sub.add_parser("eval", help="4-bit formats side by side: perplexity, weight error, plots"))
    return parser


# glibc's mallopt parameter for the size from which malloc maps memory instead of taking it from the heap.
_M_MMAP_THRESHOLD = -3


def _return_freed_tensors_to_the_os() -> None:
    """Give every CPU tensor of 128 KiB or more its own mapping, so freeing it returns the memory at once.

    glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), after which tensors of a
    few MiB (a layer's float weight, freed once quantized) come from the heap and stay resident when freed; how much
    stays depends on the order of frees across threads. Measured on ``nf4 quantize`` of the embedded SmolLM2: peak
    RSS 932-1122 MiB in some runs and ~850 in others, 824-834 MiB in every run with the threshold pinned, at the
    same speed. A fixed threshold also stops the raising. The command owns its process, so it sets this; the library
    does not.
    """
    if platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nf4`` script; returns the exit status. A torchrun worker of ``finetune --fsdp`` does
    not return: it exits by ``fsdp.exit_worker`` once its output is printed (its interpreter's shutdown can abort).
    """
    args = _parser().parse_args(argv)
    code = _run_command(args)
    if args.command == "finetune" and args.fsdp:
        import torch.distributed as dist

        from nf4 import fsdp

        if dist.is_torchelastic_launched():
            fsdp.exit_worker(code)
    return code


def _run_command(args: argparse.Namespace) -> int:
    _return_freed_tensors_to_the_os()
    run = {"quantize": _quantize, "inspect": _inspect, "generate": _generate, "finetune": _finetune, "merge": _merge}
    run = (run | {"eval": evaluate.run_cli})[args.command]
    try:
        result = run(args)
    except (checkpoint.CheckpointError, FormatError, ValueError, OSError) as e:
        print(f"nf4 {args.command}: error: {e}".splitlines()[0], file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") != "0":
        # a torchrun job (finetune --fsdp) reports once, from rank 0: every rank holds the same result, and with
        # unbuffered output two ranks' lines could interleave on the shared stdout
        return 0
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
