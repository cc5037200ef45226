"""Every Triton kernel compiles for Hopper (sm_90a) with the installed Triton, on this CPU machine.

The interpreter tests run the kernels' CPU branches; the GPU branches (inline PTX, libdevice, wgmma) are only
compiled on a GPU machine. benchmarks/sass.py compiles each launch the ops make with the wheel's own ptxas, so a
kernel that no longer builds, or starts spilling registers, fails here rather than on a user's GPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# Spill bytes a build may have. The FMA decode kernel with 4 rows of fp32 x holds 4 rows of W times 4 rows of x
# in one thread and spills 16 bytes under Triton 3.6 and 3.9 alike; at M = 3 it still beat dequantize + cuBLAS
# (0.205 against 0.28 ms on 28672x8192, docs/BENCHMARKS_GPU.md).
# The tensor-core decode kernel is capped at 64 registers (4 programs of 8 warps an SM, gemv_tc.py); register
# allocation at the cap moves with any change of the loop. Its layout for 3-4 rows of x spills nothing under Triton
# 3.6 (the device's), 8 bytes under 3.9; the one for 1-2 rows (twenty-seventh session) 0-8 bytes under 3.6 (8 in
# the M = 1 double-quant build, outside the loop; timed so, 1-4% faster than the 3-4 row layout at M = 1-2) and
# 16-24 under 3.9 (2-3 more local loads a step than before it; not timed: the device has 3.6); the paired-quad
# layout for one row of a large weight none under 3.6, 8-16 under 3.9. Its builds that sum
# split-K's slices at the end (small weights) spill 8 bytes under 3.6, 8-16 under 3.9: timed so, and faster than
# the launch.
# The small-batch one at M = 16 is capped at 80 (3 programs an SM): no spills under 3.6; under 3.9 its split-K
# double-quant build spills 16 bytes with x staged through shared memory (its one-slice build spilled 8 under both
# until the absmax was decoded once a quad; both twenty-second session). With two row groups a program (large
# weights, M = 9-16) it is capped at 128 (2 programs an SM): 8-16 bytes under 3.6, 32 under 3.9; timed with them
# (twenty-fifth session, 7-10% faster than one group at 80 registers).
SPILL_ALLOWED = {"gemv-fp32-m4-split16-dq": 16, "gemv-tc-bf16-split7-dq": 16, "gemv-tc-fp16-plain-bias": 24,
                 "gemv-tc-bf16-m2-split7-dq": 24, "gemv-tc-bf16-m4-split7-dq": 8, "gemv-tc-fp16-m3-plain-bias": 8,
                 "gemv-tcm-bf16-m16-split4-dq": 16, "gemv-tcm-bf16-m16-split4-dq-groups2": 32,
                 "gemv-tcm-fp16-m12-plain-bias-groups2": 32, "gemv-tc-bf16-split8-dq-sum": 16,
                 "gemv-tc-fp16-m4-split8-plain-bias-sum": 16, "gemv-tc-bf16-split7-dq-paired": 8,
                 "gemv-tc-fp16-split4-plain-bias-paired": 16}  # fmt: skip


# Every build benchmarks/sass.py makes (the launches the ops make on Llama-shaped weights).
BUILDS = {
    "gemv-bf16-m1-split4-dq", "gemv-fp16-m1-plain-bias", "gemv-fp32-m2-split16-dq", "gemv-fp32-m4-split16-dq",
    "gemv-tc-bf16-split7-dq", "gemv-tc-fp16-plain-bias", "gemv-tc-bf16-m2-split7-dq", "gemv-tc-bf16-split7-dq-paired",
    "gemv-tc-fp16-split4-plain-bias-paired",
    "gemv-tc-bf16-m4-split7-dq", "gemv-tc-fp16-m3-plain-bias", "gemv-tcm-bf16-m8-split4-dq",
    "gemv-tcm-fp16-m16-plain-bias", "gemv-tcm-bf16-m16-split4-dq", "gemv-tcm-bf16-m16-split4-dq-groups2",
    "gemv-tcm-fp16-m12-plain-bias-groups2", "gemv-tcm-bf16-m8-split4-dq-groups2", "gemv-tc-bf16-split8-dq-sum",
    "gemv-tc-fp16-m4-split8-plain-bias-sum", "mma-bf16-m16-rows128-dq", "mma-fp16-m64-rows64-plain",
    "dequantize-bf16-dq", "dequantize-fp16-dq-small", "dequantize-fp32-plain", "dequantize-fp32-plain-partial",
    "dequantize-bf16-dq-pre-ampere", "dequantize-fp16-plain-pre-ampere",
    "quantize-nf4-bf16-words", "quantize-nf4-bf16", "quantize-nf4-fp16", "quantize-fp4-fp32", "double-quantize",
    "quantize-nf4-bf16-words-pdl", "double-quantize-pdl", "split-k-sum",
}  # fmt: skip


def _sass(*args: str) -> dict[str, dict]:
    """benchmarks/sass.py's builds (TRITON_INTERPRET unset, this checkout's src first), by name."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sass.py"), *args], env=env, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["build"]: r for r in map(json.loads, filter(None, run.stdout.splitlines()))}


@pytest.mark.skipif(not (_BIN / "ptxas").exists() or not (_BIN / "cuobjdump").exists(), reason="no CUDA tools")
def test_every_kernel_compiles_for_hopper() -> None:
    builds = _sass()
    assert set(builds) == BUILDS
    for name, r in builds.items():
        assert 0 < r["registers"] <= 255 and r["instructions"] > 0, r
        assert r["spill_bytes"] <= SPILL_ALLOWED.get(name, 0), r
    # the table kernels' 32 KiB table (and gemv_tcm's 8.5 KiB of x buffers from M = 9) is static shared memory
    # declared in their PTX, and Triton allocates none (3 or 4 programs an SM fit in its 228 KiB, with no opt-in
    # for more than 48 KiB a program)
    for name in ("gemv-tc-bf16-split7-dq", "gemv-tc-fp16-plain-bias", "gemv-tc-bf16-m2-split7-dq",
                 "gemv-tcm-bf16-m8-split4-dq", "gemv-tcm-fp16-m16-plain-bias"):  # fmt: skip
        assert builds[name]["dynamic_shared"] == 0 and 256 * 32 * 4 <= builds[name]["shared"] <= 48 * 1024, builds[name]
    # no build asks Triton for more than 48 KiB of dynamic shared memory: past that Triton's loader sets
    # CU_FUNC_CACHE_PREFER_SHARED, which leaves L1 at its minimum (a 64 KiB table made gemv_tc 25-40% slower for
    # that reason alone, twenty-sixth session); a kernel that needs more must set its carveout itself
    assert all(r["dynamic_shared"] <= 48 * 1024 for r in builds.values()), builds
    # the decode kernels' lookups are the inline PTX they were written as: warp shuffles, byte permutes
    assert builds["gemv-bf16-m1-split4-dq"]["top"].get("SHFL", 0) >= 128
    assert builds["mma-bf16-m16-rows128-dq"]["top"].get("PRMT", 0) >= 64


# ops sends rows to the table kernels (gemv_tc, gemv_tcm) only on Ampere or newer (common.ampere_or_newer): their
# mma.sync.m16n8k16 and cp.async need sm_80; so do dequantize's conversion of a pair (cvt.rn.bf16x2.f32), which
# older GPUs replace by the builds named pre-ampere, and quantize's max.NaN on bf16 pair words (-words), which they
# load as elements. Every other build must compile for a T4 (sm_75), and all of
# them for an A100 (sm_80), but for the -pdl builds: quantize's grid dependency control (griddepcontrol) is
# Hopper's, and common.hopper_or_newer keeps it there. (sm_70, a V100, compiled under Triton 3.6's tools; 3.9's
# cuobjdump no longer reads its cubins.)
def _on(arch: int, name: str) -> bool:
    if name.endswith("-pdl"):
        return arch >= 90
    ampere_only = (
        name.startswith("gemv-tc")
        or name.endswith("-words")
        or (name.startswith("dequantize") and "partial" not in name and "fp32" not in name and "pre-ampere" not in name)
    )
    return arch >= 80 or not ampere_only


@pytest.mark.skipif(not (_BIN / "ptxas").exists() or not (_BIN / "cuobjdump").exists(), reason="no CUDA tools")
@pytest.mark.parametrize("arch", [75, 80])
def test_kernels_compile_for_the_gpus_ops_sends_them(arch: int) -> None:
    names = sorted(n for n in BUILDS if _on(arch, n))
    builds = _sass("--arch", str(arch), "--only", ",".join(names))
    assert sorted(builds) == names and all(b["arch"] == arch and b["instructions"] > 0 for b in builds.values())
