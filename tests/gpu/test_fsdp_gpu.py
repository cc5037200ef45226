"""FSDP2 on NCCL (skipped without 2 GPUs): the 4-bit bytes come back from the all-gather unchanged.

bitsandbytes #1945 is a GPU bug (NCCL-side canonicalisation of bf16 NaN patterns), so the CPU test's script runs
here on CUDA too, with the same assertions.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

_SPEC = importlib.util.spec_from_file_location("cpu_fsdp_tests", Path(__file__).parents[1] / "test_fsdp.py")
cpu_tests = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(cpu_tests)


def test_nccl_all_gather_returns_the_original_bytes(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(cpu_tests.GATHER)
    run = cpu_tests._torchrun([str(script), str(tmp_path / "report")])
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report.{rank}").read_text())
        assert all(r["data"] and r["absmax_fp32"] and r["forward"] for r in report), report
        nan = next(r for r in report if r["shape"] == [64, 128])
        assert nan["nan_bf16"] == 64 * 128 // 4 and nan["data"]
