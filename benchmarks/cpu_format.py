"""CPU speed of the format against bitsandbytes' CPU path, side by side in one process.

NF4 + double quant, blocksize 64, bf16 weights of Llama-7B/8B projection shapes: quantize, dequantize, and
x @ W.T for 1 and 16 rows of bf16 x (generation; ours: nf4.ops.matmul, bnb: bitsandbytes.matmul_4bit), with the
dense bf16 F.linear on the unquantized weight for scale. Warm medians of several runs (first calls include
compilation and are reported apart). Usage: python benchmarks/cpu_format.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch

import nf4


def _time_pair(ours: Callable[[], object], theirs: Callable[[], object], repeats: int) -> tuple[float, ...]:
    """(ours first call, ours warm median, theirs first, theirs warm median) in seconds.

    The warm calls alternate, so both see the same machine noise and the same allocator state (a freed 32 MiB
    buffer may come back from glibc's heap with its pages already mapped, or fault in afresh).
    """
    first = []
    for fn in (ours, theirs):
        t = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t)
    warm: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, times in zip((ours, theirs), warm, strict=True):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return first[0], statistics.median(warm[0]), first[1], statistics.median(warm[1])


def _bench(shape: tuple[int, int], repeats: int) -> list[dict[str, float | str]]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
    q = nf4.quantize(x)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    pairs = {
        "quantize": (lambda: nf4.quantize(x), lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=True)),
        "dequantize": (lambda: nf4.dequantize(q), lambda: F.dequantize_4bit(packed, state)),
    }
    inputs = {f"matmul M={m}": torch.randn(m, shape[1], generator=torch.Generator().manual_seed(m)).to(x.dtype)
              for m in (1, 16)}  # fmt: skip
    for op, a in inputs.items():
        pairs[op] = (lambda a=a: nf4.ops.matmul(a, q), lambda a=a: bnb.matmul_4bit(a, packed.t(), state))
    rows = []
    for op, (ours, theirs) in pairs.items():
        our_first, our_warm, their_first, their_warm = _time_pair(ours, theirs, repeats)
        rows.append({"shape": "x".join(map(str, shape)), "op": op, "nf4_ms": 1e3 * our_warm,
                     "bnb_ms": 1e3 * their_warm, "speedup": their_warm / our_warm, "nf4_first_ms": 1e3 * our_first,
                     "bnb_first_ms": 1e3 * their_first})  # fmt: skip
        if op in inputs:
            dense = _time_pair(lambda a=inputs[op]: torch.nn.functional.linear(a, x), lambda: None, repeats)[1]
            rows[-1]["bf16_dense_ms"] = 1e3 * dense
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    rows = [row for shape in ((4096, 4096), (11008, 4096)) for row in _bench(shape, args.repeats)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'shape':>11s} {'op':>12s} {'nf4 ms':>8s} {'bnb ms':>8s} {'speedup':>8s} {'first nf4/bnb ms':>18s} "
          f"{'bf16 dense ms':>14s}")  # fmt: skip
    for r in rows:
        dense = f"{r['bf16_dense_ms']:14.1f}" if "bf16_dense_ms" in r else ""
        print(f"{r['shape']:>11s} {r['op']:>12s} {r['nf4_ms']:8.1f} {r['bnb_ms']:8.1f} {r['speedup']:7.2f}x "
              f"{r['nf4_first_ms']:9.0f}/{r['bnb_first_ms']:.0f} {dense}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
