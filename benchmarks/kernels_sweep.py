"""Tile sweep for the decode GEMV (and the dequantize kernel) on one GPU: correctness at real sizes, then timings.

Usage: python benchmarks/kernels_sweep.py [--out DIR] [--shapes A,B] [--baseline FILE.py] [--dequant] [--decode]
       [--mma].
Each weight shape is replicated until the copies exceed the L2 cache and the calls rotate over them, so that every
timing streams W from device memory. Medians of a CUDA graph's replays (triton.testing.do_bench). Fused-kernel
configs at M = 1, 2, 4 are timed beside bf16 cuBLAS, dequantize + cuBLAS, bitsandbytes' matmul_4bit (if
installed) and --baseline, another gemv.py (e.g. the previous commit's) run with its default tile; --decode runs
kernels.py's 8B decode step with this gemv.py and, given --baseline, again with that one. --dequant adds the
dequantize tile sweep; --mma the tensor-core kernel's (mma.py) configs at M = 1, 2, 4, 16, beside the same
baselines. Prints one JSON line per measurement and a table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys

import torch
import triton

import nf4
from nf4 import ops
from nf4.kernels import dequantize as kdequantize
from nf4.kernels import gemm as kgemm
from nf4.kernels import gemv as kgemv
from nf4.kernels import mma as kmma

sys.path.insert(0, os.path.dirname(__file__))
from kernels import ROTATE_BYTES, bench, qargs  # noqa: E402

SHAPES = {"70B_up": (28672, 8192), "70B_down": (8192, 28672), "8B_up": (14336, 4096), "8B_down": (4096, 14336),
          "8B_qo": (4096, 4096)}  # fmt: skip
MS = (1, 2, 4)


def variants(n: int, k: int) -> dict[str, kgemv.GemvConfig]:
    """Configs timed per shape and M: the default (32 rows a warp, 4 a thread) and single changes to it."""
    d = kgemv.default_config(n, k, 64)
    return {
        "default": d,
        "split/2": dataclasses.replace(d, split_k=max(1, d.split_k // 2)),
        "split*2": dataclasses.replace(d, split_k=d.split_k * 2),
        "no-prefetch": dataclasses.replace(d, prefetch=False),
        "rows8": dataclasses.replace(d, block_n=8),
        "rows32-warps4": dataclasses.replace(d, num_warps=4),
        "rows64": dataclasses.replace(d, block_n=64),
    }


def mma_variants(n: int, k: int) -> dict[str, kmma.MmaConfig]:
    """Tensor-core kernel configs: the default for M <= 16 and single changes to it."""
    d = kmma.default_config(n, k, 64, 16)
    return {
        "default": d,
        "split/2": dataclasses.replace(d, split_k=max(1, d.split_k // 2)),
        "split*2": dataclasses.replace(d, split_k=d.split_k * 2),
        "rows64": dataclasses.replace(d, block_n=64),
        "warps8": dataclasses.replace(d, num_warps=8),
        "rows256-warps8": dataclasses.replace(d, block_n=256, num_warps=8),
        "stages2": dataclasses.replace(d, num_stages=2),
        "stages4": dataclasses.replace(d, num_stages=4),
        "nbk2": dataclasses.replace(d, nbk=2),
    }


MMA_MS = (1, 2, 4, 16)
DEQUANT = [(512, 1), (1024, 1), (2048, 1), (2048, 2), (4096, 2), (4096, 4), (8192, 4)]  # (code bytes, warps)
ROWS: list[dict] = []


def record(**kw: object) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def poison() -> None:
    torch.full((1 << 28,), float("nan"), device="cuda")


def rotated_weights(n: int, k: int) -> tuple[list, list, list, torch.Tensor]:
    """Random n x k weights to rotate over, past L2: NF4 copies (qs) and their kernel arguments (qa), a quarter as
    many bf16 copies (ws: 4x the bytes each), and the first NF4 copy dequantized to fp64 (the reference)."""
    copies = max(1, -(-ROTATE_BYTES // (n * k // 2)))
    qs = [ops.quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16)) for _ in range(copies)]
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, copies // 4))]
    return qs, [qargs(q) for q in qs], ws, nf4.dequantize(qs[0], torch.bfloat16).double()


def sweep_shape(name: str, copy_gbps: float, baseline: object, dequant: bool, mma: bool) -> None:
    n, k = SHAPES[name]
    qs, qa, ws, w0 = rotated_weights(n, k)
    floor4 = (n * k / 2 + n * k / 64) / copy_gbps / 1e6  # codes + 1 byte of absmax code per block
    for m in sorted(set(MS) | (set(MMA_MS) if mma else set())):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w0.T
        t_bf = bench([lambda w=w, x=x: x @ w.T for w in ws], True)
        t_deq = bench([lambda a=a, x=x: kgemm.gemm(x, *a, n, None) for a in qa[:2]], True)
        row = dict(what="gemv", shape=name, M=m, bf16_ms=round(t_bf, 4), deq_cublas_ms=round(t_deq, 4),
                   floor4_ms=round(floor4, 4), cfg={})  # fmt: skip
        if importlib.util.find_spec("bitsandbytes") is not None:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf

            bqs = [bnbf.quantize_4bit(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), quant_type="nf4",
                                      blocksize=64, compress_statistics=True) for _ in qs]  # fmt: skip
            row["bnb_ms"] = round(bench([lambda b=b, x=x: bnb.matmul_4bit(x, b[0].t(), b[1]) for b in bqs], True), 4)
            del bqs
        todo = [(c, key, kgemv.gemv) for key, c in variants(n, k).items()] if m in MS else []
        if mma and m in MMA_MS:
            todo += [(c, f"mma:{key}", kmma.mma) for key, c in mma_variants(n, k).items()]
        if baseline is not None and m <= kgemv.MAX_M:
            todo.append((None, "baseline", baseline.gemv))
        for cfg, key, fn in todo:
            try:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)  # fresh input for every check
                ref = x.double() @ w0.T
                poison()
                out = fn(x, *qa[0], n, None, cfg)
                rel = ((out.double() - ref).norm() / ref.norm()).item()  # NaN if any element was left unwritten
                t = bench([lambda a=a, x=x, c=cfg, f=fn: f(x, *a, n, None, c) for a in qa], True)
                row["cfg"][key] = (round(t, 4), float(f"{rel:.1e}"))
            except Exception as e:  # noqa: BLE001 - a config that fails to compile is a data point
                row["cfg"][key] = repr(e)[:120]
        record(**row)
    if not dequant:
        return
    chosen = kdequantize._SMALL, kdequantize._LARGE
    for bpp, warps in DEQUANT:
        kdequantize._SMALL = kdequantize._LARGE = (bpp, warps)  # this program size whatever the weight's size
        bufs = [torch.empty(n * k, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
        poison()
        exact = torch.equal(ops.dequantize(qs[0]), nf4.dequantize(qs[0]))
        t = bench([lambda a=a, b=b: kdequantize.dequantize(*a[:-1], 64, n * k, torch.bfloat16, out=b)
                   for a, b in zip(qa[:2], bufs, strict=True)], True)  # fmt: skip
        floor = 2.5 * n * k / copy_gbps / 1e6
        record(what="dequantize", shape=name, bpp=bpp, warps=warps, exact=exact, ms=round(t, 4),
               over_floor=round(t / floor, 3))  # fmt: skip
    kdequantize._SMALL, kdequantize._LARGE = chosen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--baseline", help="another gemv.py to time beside this one, with its default tile")
    parser.add_argument("--dequant", action="store_true")
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--mma", action="store_true")
    args = parser.parse_args()
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("gemv_baseline", args.baseline)
        baseline = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    # as kernels.py measures it: a graph of one copy read ~35% lower on an H200
    copy_gbps = 2 * 2**30 / triton.testing.do_bench(lambda a=a, b=b: b.copy_(a), return_mode="median") / 1e6
    del a, b
    record(what="device", name=torch.cuda.get_device_name(), triton=triton.__version__, copy_GBps=round(copy_gbps))
    for name in args.shapes.split(","):
        sweep_shape(name, copy_gbps, baseline, args.dequant, args.mma)
        torch.cuda.empty_cache()
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump(ROWS, f, indent=1)
    if args.decode:
        import kernels  # benchmarks/kernels.py, beside this file

        kernels.decode_step()
        kernels.RESULTS[-1]["gemv"] = "gemv.py"
        if baseline is not None:  # the same step with --baseline's kernel behind ops.matmul
            ops._kgemv = baseline
            kernels.decode_step()
            kernels.RESULTS[-1]["gemv"] = args.baseline
        ROWS.extend(kernels.RESULTS)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(ROWS, f, indent=1)
    for r in ROWS:
        if r["what"] == "gemv":
            timed = [(v[0], c) for c, v in r["cfg"].items() if isinstance(v, tuple)]
            best = min(timed, default=(r["deq_cublas_ms"], "deq+cublas"))
            print(
                f"{r['shape']:8} M={r['M']:<3} bf16 {r['bf16_ms']:.4f} bnb {r.get('bnb_ms')} "
                f"deq+cublas {r['deq_cublas_ms']:.4f} "
                f"floor4 {r['floor4_ms']:.4f} best {best[1]} {best[0]:.4f} -> {r['bf16_ms'] / best[0]:.2f}x bf16 | "
                + " ".join(f"{c}:{v[0] if isinstance(v, tuple) else 'ERR'}" for c, v in r["cfg"].items())
            )
        elif r["what"] == "dequantize":
            print(
                f"{r['shape']:8} dequant bpp={r['bpp']} w={r['warps']} exact={r['exact']} {r['ms']} ms "
                f"{r['over_floor']}x floor"
            )


if __name__ == "__main__":
    main()
