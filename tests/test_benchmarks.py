"""benchmarks/kernels.py's verdicts on issue 3's targets, from records shaped as one of its runs writes them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
_SPEC = importlib.util.spec_from_file_location("kernels_bench", Path(__file__).parents[1] / "benchmarks" / "kernels.py")
kernels_bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(kernels_bench)


def _matmul(shape: str, m: int, bf16_ms: float, ours_ms: float, cold: tuple[float, float] | None = None) -> dict:
    """A record as bench_matmul writes it (bitsandbytes at the bf16 time: not read by any target); cold: the
    (bf16, ours) times with the weights rotated past L2, which runs since the twenty-third session record."""
    speedup = round(bf16_ms / ours_ms, 2)
    r = dict(what="matmul", shape=shape, M=m, bf16_ms=bf16_ms, ours_ms=ours_ms, bnb_ms=bf16_ms,
             speedup_vs_bf16=speedup, bnb_speedup_vs_bf16=1.0)  # fmt: skip
    if cold:
        r |= dict(bf16_cold_ms=cold[0], ours_cold_ms=cold[1], cold_speedup_vs_bf16=round(cold[0] / cold[1], 2))
    return r


# the fifteenth session's H200 figures (docs/BENCHMARKS.md), two shapes each
RUN = [
    dict(what="copy_GBps", value=4227.0),
    dict(what="quantize", shape="70B_up", kernels_over_floor=1.41),
    dict(what="quantize", shape="8B_qo", kernels_over_floor=1.90),
    dict(what="dequantize", shape="70B_up", ours_over_floor=1.13),
    dict(what="dequantize", shape="70B_down", ours_over_floor=1.13),
    _matmul("70B_up", 1, 0.1070, 0.0581),
    _matmul("8B_up", 1, 0.0305, 0.0203),
    _matmul("8B_qo", 1, 0.0108, 0.0085, cold=(0.0139, 0.0088)),
    _matmul("70B_up", 16, 0.1080, 0.1084),
    _matmul("70B_up", 2048, 1.388, 1.542),
    _matmul("8B_qo", 2048, 0.091, 0.0945),
    dict(what="decode_step_8B_linears", batch=1, ours_speedup_vs_bf16=1.52),
    dict(what="decode_step_8B_linears", batch=16, ours_speedup_vs_bf16=1.02),
]


def test_each_target_reads_its_own_records_worst_first() -> None:
    rows = {r["target"]: r for r in kernels_bench.verdicts(RUN)}
    assert list(rows) == [
        "quantize + double quant, kernels / floor <= 1.5",
        "dequantize -> bf16 / floor <= 1.15",
        "M=1 on the 70B shapes, speed / bf16, weights past L2 >= 3.5",
        "M=1 on the 8B shapes, speed / bf16, weights past L2 >= 3.0",
        "M=16, speed / bf16, weights past L2 >= 3.0",
        "M=2048, time / bf16 <= 1.05",
        "8B decode step at batch 1, tokens/s / bf16 >= 3.0",
    ]
    quantize = rows["quantize + double quant, kernels / floor <= 1.5"]
    assert quantize["figures"] == [(1.9, "8B_qo"), (1.41, "70B_up")] and quantize["met"] == 1
    assert rows["dequantize -> bf16 / floor <= 1.15"]["met"] == 2
    assert rows["M=1 on the 70B shapes, speed / bf16, weights past L2 >= 3.5"]["figures"] == [(1.84, "70B_up")]
    # a record with rotated weights is read by them (8B q/o: 1.58, not the one weight's 1.27); one without, as is
    m1_8b = rows["M=1 on the 8B shapes, speed / bf16, weights past L2 >= 3.0"]
    assert m1_8b["figures"] == [(1.5, "8B_up"), (1.58, "8B_qo")]
    m2048 = rows["M=2048, time / bf16 <= 1.05"]
    assert m2048["figures"] == [(1.11, "70B_up"), (1.04, "8B_qo")] and m2048["met"] == 1
    step = rows["8B decode step at batch 1, tokens/s / bf16 >= 3.0"]
    assert step["figures"] == [(1.52, "batch 1")] and step["met"] == 0


def test_summary_prints_the_verdicts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(kernels_bench, "RESULTS", RUN)
    kernels_bench.summary()
    out = capsys.readouterr().out
    assert "dequantize -> bf16 / floor <= 1.15: met (70B_up 1.13, 70B_down 1.13)" in out
    assert "M=2048, time / bf16 <= 1.05: met on 1 of 2 (70B_up 1.11, 8B_qo 1.04)" in out
    assert "M=16, speed / bf16, weights past L2 >= 3.0: met on 0 of 1 (70B_up 1.0)" in out


def test_summary_of_a_saved_run(tmp_path: Path) -> None:
    """--summary reads kernels.json (no GPU needed) and prints the same verdicts."""
    saved = tmp_path / "kernels.json"
    saved.write_text(json.dumps(RUN))
    script = Path(__file__).parents[1] / "benchmarks" / "kernels.py"
    run = subprocess.run([sys.executable, str(script), "--summary", str(saved)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "8B decode step at batch 1, tokens/s / bf16 >= 3.0: met on 0 of 1 (batch 1 1.52)" in run.stdout
