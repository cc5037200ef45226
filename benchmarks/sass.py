"""Compile nf4's Triton kernels for Hopper (sm_90a) on any machine, without a GPU: registers, spills, SASS.

Usage: python benchmarks/sass.py [--only NAME,...] [--sass DIR] [--arch 90]
Prints one JSON line per build: registers a thread, spill bytes (local + stack), static and dynamic shared memory,
SASS instructions. The builds are the launches the ops make on Llama-shaped weights (BUILDS below), compiled with the
installed Triton and the ptxas / cuobjdump its wheel ships, so reading a kernel's SASS or register count costs no
GPU time (Triton 3.6, installed with ``pip install --target DIR triton==3.6.0`` and put first on PYTHONPATH,
gives the device's counts). tests/test_sass.py checks that every build compiles without spills. Runs with
TRITON_INTERPRET unset: under the interpreter ``@triton.jit`` yields functions the compiler cannot take.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from nf4.kernels import common, dequantize, gemv, gemv_tc, gemv_tcm, mma, quantize  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_FP32 = "*fp32"


def _scales(double_quant: bool) -> dict[str, str]:
    """Pointer types of the five scale arguments (common.scale_args: plain absmax passes fp32 stand-ins)."""
    absmax = "*u8" if double_quant else _FP32
    return dict(absmax_ptr=absmax, quant_map_ptr=_FP32, nested_absmax_ptr=_FP32, nested_quant_map_ptr=_FP32,
                nested_offset_ptr=_FP32)  # fmt: skip


def _gemv(out: str, kind: int, m: int, split_k: int, double_quant: bool, bias: bool) -> tuple:
    ptrs = dict(x_ptr="*i32", data_ptr="*i32", bias_ptr=out, out_ptr=out, **_scales(double_quant),
                partial_ptr=_FP32 if split_k > 1 else out, counter_ptr="*i32" if split_k > 1 else out)  # fmt: skip
    consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, HAS_BIAS=bias, X_KIND=kind, BLOCK_M=m, BLOCK_N=32, NBK=2,
                  SPLIT_K=split_k, SUM_IN_KERNEL=True, PREFETCH=True, PLAIN_LOADS=False)  # fmt: skip
    return gemv._gemv_kernel, ptrs, consts, 1, 3


def _gemv_tc(
    x: str, m: int, split_k: int, double_quant: bool, bias: bool, sum_in_kernel: bool = False, paired: bool = False
) -> tuple:
    ptrs = dict(x_ptr="*i32", data_ptr="*i32", bias_ptr=x, out_ptr=x, partial_ptr=_FP32, counter_ptr="*i32",
                **_scales(double_quant))  # fmt: skip
    consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, HAS_BIAS=bias, X_KIND=0 if x == "*bf16" else 1,
                  BLOCK_N=gemv_tc.BLOCK_N, SPLIT_K=split_k, ROWS=m, SUM_IN_KERNEL=sum_in_kernel,
                  PAIRED=paired)  # fmt: skip
    return gemv_tc._gemv_tc_kernel, ptrs, consts, gemv_tc.BLOCK_N // 16, 3, {"maxnreg": gemv_tc.MAX_REGISTERS}


def _gemv_tcm(x: str, m: int, split_k: int, double_quant: bool, bias: bool, groups: int = 1) -> tuple:
    ptrs = dict(x_ptr="*i32", data_ptr="*i32", bias_ptr=x, out_ptr=x, partial_ptr=_FP32, **_scales(double_quant))
    consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, HAS_BIAS=bias, X_KIND=0 if x == "*bf16" else 1,
                  BLOCK_N=gemv_tcm.BLOCK_N, SPLIT_K=split_k, HALVES=2 if m > 8 else 1, GROUPS=groups,
                  XS=m > 8)  # fmt: skip
    max_registers = gemv_tcm._occupancy(m, groups)[1]
    return gemv_tcm._gemv_tcm_kernel, ptrs, consts, gemv_tcm.BLOCK_N // 16, 3, {"maxnreg": max_registers}


def _mma(x: str, m: int, block_n: int, split_k: int, double_quant: bool) -> tuple:
    ptrs = dict(x_ptr=x, data_ptr="*u8", bias_ptr=x, out_ptr=x, partial_ptr=_FP32, counter_ptr=_FP32,
                **_scales(double_quant))  # fmt: skip
    consts = dict(BLOCKSIZE=64, DOUBLE_QUANT=double_quant, HAS_BIAS=False, BLOCK_M=m, BLOCK_N=block_n, NBK=1,
                  SPLIT_K=split_k, SUM_IN_KERNEL=False)  # fmt: skip
    return mma._mma_kernel, ptrs, consts, 4, 3


def _dequantize(out: str, double_quant: bool, partial: bool, large: bool = True, pair_cvt: bool = True) -> tuple:
    """pair_cvt: one conversion for both values of a byte (sm_80 and newer)."""
    kind = {"*bf16": 0, "*fp16": 1, _FP32: 2}[out]
    nbytes, warps = (32, 4) if partial else dequantize._LARGE if large else dequantize._SMALL
    ptrs = dict(data_ptr="*u8", out_ptr=out, **_scales(double_quant))
    consts = dict(BLOCKSIZE=64, NB=nbytes // 32, DOUBLE_QUANT=double_quant, PARTIAL=partial, OUT_KIND=kind,
                  PAIR_CVT=pair_cvt, THREADS=32 * warps)  # fmt: skip
    return dequantize._dequantize_kernel, ptrs, consts, warps, 3


def _quantize(x: str, fp4: bool, words: bool = False, pdl: bool = False) -> tuple:
    """words: bf16 loaded as pair words (x 4-byte aligned); pdl: Hopper's, triggering the double quant's launch."""
    ptrs = dict(x_ptr=x, tables_ptr="*i32" if fp4 else "*i64", rcp_delta_ptr="*i32", data_ptr="*u8", absmax_ptr=_FP32,
                sums_ptr="*fp64")  # fmt: skip
    nb = (quantize._FP4_ELEMENTS_PER_PROGRAM if fp4 else quantize._ELEMENTS_PER_PROGRAM) // 64
    consts = dict(BLOCKSIZE=64, NB=nb, NTHRESHOLDS=7, SIGN_MAGNITUDE=fp4, BUCKETS=quantize._BUCKETS, PARTIAL=False,
                  BF16_WORDS=words, SUMS=True, G=quantize._SUM_SLOTS, THREADS=32 * quantize._NUM_WARPS,
                  TRIGGER=pdl)  # fmt: skip
    return quantize._quantize_kernel, ptrs, consts, quantize._NUM_WARPS, 3


def _double_quantize(pdl: bool = False) -> tuple:
    ptrs = dict(absmax_ptr=_FP32, sums_ptr="*fp64", counter_ptr="*i32", table_ptr="*i64", rcp_delta_ptr="*i32",
                codes_ptr="*u8", nested_absmax_ptr=_FP32, offset_ptr=_FP32)  # fmt: skip
    consts = dict(G=quantize._SUM_SLOTS, NBN=quantize._NESTED_PER_PROGRAM, KEY_MIN=quantize._DQ_KEY_MIN,
                  SIDE=quantize._DQ_SIDE, WAIT=pdl)  # fmt: skip
    return quantize._double_quantize_kernel, ptrs, consts, 4, 3


def _split_k_sum() -> tuple:
    ptrs = dict(partial_ptr=_FP32, bias_ptr="*bf16", out_ptr="*bf16")
    return common._split_k_sum_kernel, ptrs, dict(SPLIT_K=16, HAS_BIAS=True, BLOCK=1024), 4, 3


BUILDS = {
    "gemv-bf16-m1-split4-dq": _gemv("*bf16", 0, 1, 4, True, False),
    "gemv-fp16-m1-plain-bias": _gemv("*fp16", 1, 1, 1, False, True),
    "gemv-fp32-m2-split16-dq": _gemv(_FP32, 2, 2, 16, True, False),
    "gemv-fp32-m4-split16-dq": _gemv(_FP32, 2, 4, 16, True, False),
    "gemv-tc-bf16-split7-dq": _gemv_tc("*bf16", 1, 7, True, False),
    "gemv-tc-bf16-split7-dq-paired": _gemv_tc("*bf16", 1, 7, True, False, paired=True),
    "gemv-tc-fp16-split4-plain-bias-paired": _gemv_tc("*fp16", 1, 4, False, True, paired=True),
    "gemv-tc-fp16-plain-bias": _gemv_tc("*fp16", 1, 1, False, True),
    "gemv-tc-bf16-m2-split7-dq": _gemv_tc("*bf16", 2, 7, True, False),
    "gemv-tc-bf16-m4-split7-dq": _gemv_tc("*bf16", 4, 7, True, False),
    "gemv-tc-fp16-m3-plain-bias": _gemv_tc("*fp16", 3, 1, False, True),
    "gemv-tc-bf16-split8-dq-sum": _gemv_tc("*bf16", 1, 8, True, False, True),
    "gemv-tc-fp16-m4-split8-plain-bias-sum": _gemv_tc("*fp16", 4, 8, False, True, True),
    "gemv-tcm-bf16-m8-split4-dq": _gemv_tcm("*bf16", 8, 4, True, False),
    "gemv-tcm-fp16-m16-plain-bias": _gemv_tcm("*fp16", 16, 1, False, True),
    "gemv-tcm-bf16-m16-split4-dq": _gemv_tcm("*bf16", 16, 4, True, False),
    "gemv-tcm-bf16-m16-split4-dq-groups2": _gemv_tcm("*bf16", 16, 4, True, False, 2),
    "gemv-tcm-fp16-m12-plain-bias-groups2": _gemv_tcm("*fp16", 12, 1, False, True, 2),
    "gemv-tcm-bf16-m8-split4-dq-groups2": _gemv_tcm("*bf16", 8, 4, True, False, 2),
    "mma-bf16-m16-rows128-dq": _mma("*bf16", 16, 128, 4, True),
    "mma-fp16-m64-rows64-plain": _mma("*fp16", 64, 64, 1, False),
    "dequantize-bf16-dq": _dequantize("*bf16", True, False),
    "dequantize-fp16-dq-small": _dequantize("*fp16", True, False, large=False),
    "dequantize-bf16-dq-pre-ampere": _dequantize("*bf16", True, False, pair_cvt=False),
    "dequantize-fp16-plain-pre-ampere": _dequantize("*fp16", False, False, pair_cvt=False),
    "dequantize-fp32-plain": _dequantize(_FP32, False, False),
    "dequantize-fp32-plain-partial": _dequantize(_FP32, False, True),
    "quantize-nf4-bf16-words": _quantize("*bf16", False, words=True),
    "quantize-nf4-bf16-words-pdl": _quantize("*bf16", False, words=True, pdl=True),
    "quantize-nf4-bf16": _quantize("*bf16", False),
    "quantize-nf4-fp16": _quantize("*fp16", False),
    "quantize-fp4-fp32": _quantize(_FP32, True),
    "double-quantize": _double_quantize(),
    "double-quantize-pdl": _double_quantize(pdl=True),
    "split-k-sum": _split_k_sum(),
}


def build(
    kernel: triton.JITFunction,
    ptrs: dict,
    consts: dict,
    num_warps: int,
    num_stages: int,
    options: dict | None = None,
    arch: int = 90,
) -> dict:
    """Compile for sm_<arch> (90: sm_90a) and read the cubin's resource usage and SASS. Pointers and integer
    arguments are marked 16-divisible, as Triton specializes them on Llama-shaped weights."""
    consts = {**consts, "INTERPRETED": False} if "INTERPRETED" in kernel.arg_names else consts
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if kernel.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts.pop(name)
        else:
            signature[name] = ptrs.pop(name) if name.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    assert not ptrs and not consts, (ptrs, consts)  # every given argument names one of the kernel's
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})},
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    mix = collections.Counter(op.split(".")[0] for op in ops)
    return dict(registers=res["REG"], spill_bytes=res["LOCAL"] + res["STACK"], shared=res["SHARED"],
                dynamic_shared=compiled.metadata.shared, instructions=len(ops), top=dict(mix.most_common(8)),
                sass=sass)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", help="comma-separated build names (default: all)")
    parser.add_argument("--sass", help="directory to write each build's SASS to")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default: 90)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(BUILDS)
    for name in names:
        kernel, ptrs, consts, num_warps, num_stages, *options = BUILDS[name]
        result = build(kernel, dict(ptrs), dict(consts), num_warps, num_stages, *options, arch=args.arch)
        sass = result.pop("sass")
        if args.sass:
            os.makedirs(args.sass, exist_ok=True)
            with open(os.path.join(args.sass, f"{name}.sass"), "w") as f:
                f.write(sass)
        print(json.dumps(dict(build=name, arch=args.arch, triton=triton.__version__, **result)), flush=True)


if __name__ == "__main__":
    main()
