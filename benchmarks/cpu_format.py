"""CPU speed of the format against bitsandbytes' CPU path, side by side in one process.

NF4 + double quant, blocksize 64, bf16 weights of Llama-7B/8B projection shapes. Warm medians of several
runs (first calls include compilation and are reported apart). Usage: python benchmarks/cpu_format.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import bitsandbytes.functional as F
import torch

import nf4


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call, median of the warm calls) in seconds."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    return first, statistics.median(warm)


def _bench(shape: tuple[int, int], repeats: int) -> list[dict[str, float | str]]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02
    q = nf4.quantize(x)
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = {
        "quantize": _time(lambda: nf4.quantize(x), repeats),
        "dequantize": _time(lambda: nf4.dequantize(q), repeats),
    }
    theirs = {
        "quantize": _time(lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=True), repeats),
        "dequantize": _time(lambda: F.dequantize_4bit(packed, state), repeats),
    }
    return [
        {"shape": "x".join(map(str, shape)), "op": op, "nf4_ms": 1e3 * ours[op][1], "bnb_ms": 1e3 * theirs[op][1],
         "speedup": theirs[op][1] / ours[op][1], "nf4_first_ms": 1e3 * ours[op][0], "bnb_first_ms": 1e3 * theirs[op][0]}
        for op in ours
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    rows = [row for shape in ((4096, 4096), (11008, 4096)) for row in _bench(shape, args.repeats)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'shape':>11s} {'op':>10s} {'nf4 ms':>8s} {'bnb ms':>8s} {'speedup':>8s} {'first nf4/bnb ms':>18s}")
    for r in rows:
        print(f"{r['shape']:>11s} {r['op']:>10s} {r['nf4_ms']:8.1f} {r['bnb_ms']:8.1f} {r['speedup']:7.2f}x "
              f"{r['nf4_first_ms']:9.0f}/{r['bnb_first_ms']:.0f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
