"""Write the golden fixtures: bitsandbytes' CUDA output on a fixed set of hard inputs.

Run on a GPU machine with bitsandbytes installed (``python tests/golden/make_golden.py OUT_DIR``); it writes
``inputs.safetensors`` (fp32 inputs) and ``bnb_cuda.safetensors`` (packed codes, absmax, double-quant state
and dequantized values for nf4/fp4 x double quant on/off x every block size x fp32/fp16/bf16), plus
``meta.json`` (versions, card). CI compares `nf4` with these on CPU (tests/test_golden.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DEQUANT_BLOCKSIZES = (32, 64, 4096)  # dequantized values kept for these only, to keep the fixture small
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_inputs() -> dict[str, torch.Tensor]:
    """Fixed hard cases (fp32). Shapes are odd-sized so that every block size has a partial last block."""
    g = torch.Generator().manual_seed(2026)
    nf4 = torch.tensor(
        [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
         -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
         0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
         0.7229568362236023, 1.0]
    )  # fmt: skip
    mids = ((nf4[1:].double() + nf4[:-1].double()) / 2).float()
    fp4_mids = torch.tensor([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333])
    # Ties: every threshold, its fp32 neighbours, the levels themselves, in blocks whose absmax is exactly 1.
    edges = torch.cat([mids, fp4_mids, -fp4_mids, nf4])
    ties = torch.cat([edges, torch.nextafter(edges, torch.tensor(2.0)), torch.nextafter(edges, torch.tensor(-2.0))])
    ties = ties.clamp(-1, 1)
    # 31 shuffled tie values after every 1.0, so that every block (>= 32) has absmax exactly 1
    ties = torch.cat([ties[torch.randperm(ties.numel(), generator=g)] for _ in range(40)])[: 31 * 130].view(-1, 31)
    ties = torch.cat([torch.ones(ties.shape[0], 1), ties], dim=1)
    inputs = {
        "ties": ties.reshape(-1)[:4001],  # 4001: a partial last block
        "zeros_all": torch.zeros(201),
        # zero blocks at the start, in the middle and a partial zero block at the end
        "zeros_mixed": torch.cat([torch.zeros(4096), torch.randn(4096, generator=g), torch.zeros(8192 + 77)]),
        "negmax": -torch.rand(3001, generator=g) * torch.tensor([1.0, 3.0]).repeat(1501)[:3001],
        "tiny": torch.randn(1999, generator=g) * 1e-39,  # subnormal absmax: 1/absmax overflows to inf
        "huge": torch.randn(1999, generator=g) * 1e37,
        "big": torch.randn(257, 251, generator=g).reshape(-1),  # ~1000 blocks of 64: several nested blocks
    }
    for e in (-30, -6, -3, 0, 3, 6, 30):
        inputs[f"randn_1e{e}"] = torch.randn(7, 333, generator=g).reshape(-1) * 10.0**e
    return inputs


def main(out_dir: str) -> None:
    import bitsandbytes
    import bitsandbytes.functional as F

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs()
    golden: dict[str, torch.Tensor] = {}
    skipped = []
    for name, x32 in inputs.items():
        for dname, dtype in DTYPES.items():
            x = x32.to(dtype)
            if not torch.isfinite(x).all():
                skipped.append(f"{name}/{dname}: not finite in {dname}")
                continue
            for qt in ("nf4", "fp4"):
                for bs in BLOCKSIZES:
                    for dq in (False, True):
                        key = f"{name}/{dname}/{qt}/{bs}/{'dq' if dq else 'nodq'}"
                        try:
                            packed, st = F.quantize_4bit(x.cuda(), blocksize=bs, quant_type=qt, compress_statistics=dq)
                            deq = F.dequantize_4bit(packed, st)
                        except Exception as e:  # record what bnb refuses, e.g. an unsupported block size
                            skipped.append(f"{key}: {type(e).__name__}: {e}")
                            continue
                        torch.cuda.synchronize()
                        golden[f"{key}/packed"] = packed.cpu().reshape(-1)
                        golden[f"{key}/absmax"] = st.absmax.cpu()
                        if bs in DEQUANT_BLOCKSIZES and (name != "big" or bs == 64):
                            golden[f"{key}/dequant"] = deq.cpu().reshape(-1)
                        if dq:
                            golden[f"{key}/nested_absmax"] = st.state2.absmax.cpu()
                            golden[f"{key}/offset"] = st.offset.cpu().reshape(1)
    save_file(inputs, str(out / "inputs.safetensors"))
    save_file({k: v.contiguous() for k, v in golden.items()}, str(out / "bnb_cuda.safetensors"))
    meta = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "skipped": skipped,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(f"{len(golden)} tensors, {len(skipped)} skipped; {meta['device']}, bnb {meta['bitsandbytes']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
