"""A/B of quantize variants on one GPU, in one process: times against the floor, and equal bytes.

Usage: python benchmarks/ab_quantize.py [--shapes 4096x4096,...] [--rounds 2] [--out DIR] --variant SPEC [...]
SPEC is benchmarks/ab.py's LABEL=PATH[:ATTR=VALUE,...]: a copy of src/nf4/kernels/quantize.py (a file under out/,
say, with the change to try) and module attributes set around its calls (``_ELEMENTS_PER_PROGRAM=4096``). Per
shape and round, each variant's whole quantize with double quant and its 4-bit pass alone, both bf16 and graph-timed
as kernels.py times quantize (kernels only), as multiples of the floor (2.5 bytes a parameter at the measured copy
bandwidth), and whether its four outputs equal the committed kernel's on that weight. One JSON line a row, and
ab_quantize.json in DIR. Rounds repeat the shapes so that a variant's spread shows beside the others', each round
timing the variants in a rotated order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import ModuleType

import torch
import triton

from nf4.kernels import quantize as committed

sys.path.insert(0, os.path.dirname(__file__))
import kernels  # noqa: E402
from ab import Variant, applied, parse_variant  # noqa: E402

SHAPES = "4096x4096,6144x4096,14336x4096,8192x8192,28672x8192"


def _timed(variant: Variant, w: torch.Tensor, reference: tuple, floor_ms: float) -> dict:
    """The variant's whole quantize and pass / floor, and whether its bytes are the committed kernel's."""
    with applied(variant) as module:
        try:
            out = module.quantize(w, "nf4", 64, True)
            equal = all(torch.equal(a, b) for a, b in zip(out, reference, strict=True))
            whole = kernels.bench(lambda: module.quantize(w, "nf4", 64, True), graph=True)
            one_pass = kernels.bench(lambda: module.quantize_4bit(w, "nf4", 64), graph=True)
            return dict(whole_x=round(whole / floor_ms, 3), pass_x=round(one_pass / floor_ms, 3), equal=equal)
        except Exception as e:  # noqa: BLE001 - a variant that fails to build or run is a result too
            return dict(error=repr(e)[:300])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--variant", action="append", required=True)
    args = parser.parse_args()
    modules: dict[str, ModuleType] = {}
    variants = [parse_variant(spec, modules) for spec in args.variant]
    copy_gbps = kernels.copy_bandwidth()
    rows = [dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                 copy_GBps=round(copy_gbps))]  # fmt: skip
    print(json.dumps(rows[0]), flush=True)
    for round_ in range(args.rounds):
        for shape in args.shapes.split(","):
            n, k = map(int, shape.split("x"))
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            floor_ms = 2.5 * n * k / copy_gbps / 1e6
            reference = committed.quantize(w, "nf4", 64, True)
            row: dict = dict(round=round_, shape=shape)
            # each round starts at the next variant: on 28672x8192 a variant's time moved by up to 15% with its
            # place in the order (identical copies, twenty-sixth session), so no variant keeps one place
            shift = round_ % len(variants)
            for v in variants[shift:] + variants[:shift]:
                row[v.label] = _timed(v, w, reference, floor_ms)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "ab_quantize.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
