"""A/B of fused-matmul kernel variants on one GPU, in one process: times, errors, registers.

Usage: python benchmarks/ab.py [--fn gemv|gemv_tc|gemv_tcm|mma] [--m M] [--shapes A,B] [--out DIR] [--probe N]
    --variant SPEC [--variant SPEC ...]
SPEC is LABEL=PATH[:ATTR=VALUE,...][@FIELD=VALUE,...]: a copy of the kernel's module (a file under out/, say, with
the change to try), module attributes set before each call (e.g. a LOOKUP switch the copy reads), and fields of
its default config replaced (a negative split_k divides the default one). Per shape: bf16 cuBLAS and each variant
at M rows, weights rotated past L2, medians of CUDA-graph replays (kernels.bench); each variant's error
against fp64 on a fresh input with its output poisoned first, whether it is bit-equal to ``ops.matmul`` (the
committed kernel), its split and its compiled kernels' (warps, registers, spills). One JSON line per shape, and
ab.json in DIR. The tenth session's A/B tables (docs/BENCHMARKS_GPU.md) came from this script's first version.

--probe N times nothing: it calls each variant N times on each shape (rotating over the weights) and exits, for a
profiler, e.g. ``ncu -k regex:_gemv_tc_kernel --launch-skip 5 --launch-count 1 python benchmarks/ab.py --probe 8
--fn gemv_tc --shapes 70B_up --variant head=src/nf4/kernels/gemv_tc.py``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from types import ModuleType

import torch
import triton

from nf4 import ops

sys.path.insert(0, os.path.dirname(__file__))
import kernels  # noqa: E402
import kernels_sweep as ks  # noqa: E402


@dataclasses.dataclass
class Variant:
    label: str
    module: ModuleType
    attrs: dict
    fields: dict


def _values(text: str) -> dict:
    """'a=1,b=True' -> {'a': 1, 'b': True}."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {key: ast.literal_eval(value) for key, value in pairs}


def parse_variant(spec: str, modules: dict[str, ModuleType]) -> Variant:
    """LABEL=PATH[:ATTR=VALUE,...][@FIELD=VALUE,...] -> Variant (one module object per path)."""
    label, rest = spec.split("=", 1)
    rest, _, fields = rest.partition("@")
    path, _, attrs = rest.partition(":")
    if path not in modules:
        name = f"ab_variant_{len(modules)}"
        spec_ = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
        modules[path] = module
    return Variant(label, modules[path], _values(attrs), _values(fields))


@contextlib.contextmanager
def applied(v: Variant) -> Iterator[ModuleType]:
    """v's module with v's attributes set, restored on exit (variants share modules)."""
    saved = {attr: getattr(v.module, attr) for attr in v.attrs}
    for attr, value in v.attrs.items():
        setattr(v.module, attr, value)
    try:
        yield v.module
    finally:
        for attr, value in saved.items():
            setattr(v.module, attr, value)


def _registers(module: ModuleType, fn: str) -> list:
    """(warps, registers, spills) of every compilation of the module's kernel so far."""
    kernel = getattr(module, f"_{fn}_kernel")
    found = {(c.metadata.num_warps, c.n_regs, c.n_spills) for cache in kernel.device_caches.values() for c in
             cache[0].values()}  # fmt: skip
    return sorted(found)


def _default_config(module: ModuleType, fn: str, n: int, k: int, m: int) -> object:
    """The module's config for an n x k weight at m rows (each kernel's default_config takes its own arguments)."""
    device = torch.device("cuda")
    if fn == "gemv":
        return module.default_config(n, k, 64)
    if fn == "mma":
        return module.default_config(n, k, 64, m)
    if fn == "gemv_tc":
        return module.default_config(n, k, device)
    return module.default_config(n, k, m, device)


def _config(module: ModuleType, fn: str, n: int, k: int, m: int, v: Variant) -> object:
    """The module's default config with v's fields (a negative split_k divides the default one)."""
    default = _default_config(module, fn, n, k, m)
    fields = dict(v.fields)
    if fields.get("split_k", 1) < 0:
        fields["split_k"] = max(1, default.split_k // -fields["split_k"])
    return dataclasses.replace(default, **fields)


def run_shape(name: str, fn: str, m: int, variants: list[Variant]) -> dict:
    n, k = ks.SHAPES[name]
    qs, qa, ws, w0 = ks.rotated_weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    row: dict = dict(shape=name, M=m, bf16_ms=round(kernels.bench([lambda w=w: x @ w.T for w in ws], True), 4))
    for v in variants:
        with applied(v) as module:
            config = _config(module, fn, n, k, m, v)
            call = getattr(module, fn)
            try:
                fresh = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ks.poison()
                out = call(fresh, *qa[0], n, None, config)
                ref = fresh.double() @ w0.T
                rel = ((out.double() - ref).norm() / ref.norm()).item()  # NaN if an element was left unwritten
                ms = kernels.bench([lambda a=a, f=call, c=config: f(x, *a, n, None, c) for a in qa], True)
                row[v.label] = dict(ms=round(ms, 4), rel_err=float(f"{rel:.2e}"), split_k=config.split_k,
                                    bit_equal=torch.equal(out, ops.matmul(fresh, qs[0])))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a variant that fails to build or run is a result too
                row[v.label] = repr(e)[:300]
    row["kernels"] = {v.label: _registers(v.module, fn) for v in variants}
    return row


def probe_shape(name: str, fn: str, m: int, variants: list[Variant], calls: int) -> None:
    """Each variant's kernel ``calls`` times on the shape's weights, in turn, with no timing around them."""
    n, k = ks.SHAPES[name]
    _, qa, _, _ = ks.rotated_weights(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for v in variants:
        with applied(v) as module:
            config = _config(module, fn, n, k, m, v)
            for i in range(calls):
                getattr(module, fn)(x, *qa[i % len(qa)], n, None, config)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fn", choices=("gemv", "gemv_tc", "gemv_tcm", "mma"), default="gemv")
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--shapes", default="70B_up,70B_down,8B_up,8B_down,8B_qo")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--probe", type=int, default=0, metavar="N", help="N untimed calls a variant, for a profiler")
    args = parser.parse_args()
    modules: dict[str, ModuleType] = {}
    variants = [parse_variant(spec, modules) for spec in args.variant]
    if args.probe:
        for name in args.shapes.split(","):
            probe_shape(name, args.fn, args.m, variants, args.probe)
        return
    rows = [dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                 copy_GBps=round(kernels.copy_bandwidth()))]  # fmt: skip
    print(json.dumps(rows[0]), flush=True)
    for name in args.shapes.split(","):
        rows.append(run_shape(name, args.fn, args.m, variants))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "ab.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
