"""Which reciprocal does bitsandbytes' CUDA quantizer use? (it is built with fast math)

Compares bitsandbytes' NF4/FP4 codes on random data with our encoder fed by candidate reciprocals computed on
the GPU: IEEE (1/x rounded to nearest), rcp.approx.ftz.f32, div.full.ftz.f32. Then tabulates, for every fp32
mantissa in [1, 2), how far rcp.approx lands from the correctly rounded reciprocal (the exceptions are saved).
"""

import sys

import bitsandbytes.functional as F
import torch
import triton
import triton.language as tl

from nf4 import format as fmt


@triton.jit
def _rcp_kernel(x_ptr, o_ptr, n, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=1.0)
    if MODE == 0:
        asm = "rcp.approx.ftz.f32 $0, $1;"
        y = tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        asm = "div.full.ftz.f32 $0, 0f3F800000, $1;"
        y = tl.inline_asm_elementwise(asm, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    tl.store(o_ptr + offs, y, mask=m)


def rcp(x, mode):
    o = torch.empty_like(x)
    _rcp_kernel[(triton.cdiv(x.numel(), 1024),)](x, o, x.numel(), MODE=mode, BLOCK=1024)
    return o


def encode(x, qt, bs, mode):
    xb = x.float().view(-1, bs)
    xb = torch.where(xb.abs() < 2**-126, 0.0, xb)  # ftz on inputs
    am = xb.abs().amax(1)
    r = (1.0 / am) if mode == "ieee" else rcp(am.contiguous(), 0 if mode == "rcp" else 1)
    y = xb * r[:, None]
    y = torch.where(y.abs() < 2**-126, torch.copysign(torch.zeros_like(y), y), y)
    return fmt._pack(fmt._encode_4bit(y, qt).view(-1)), am


out = sys.argv[1]
g = torch.Generator().manual_seed(123)
res = {}
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for qt in ("nf4", "fp4"):
        x = (torch.randn(1 << 24, generator=g) * 0.05).to(dt).cuda()
        p, s = F.quantize_4bit(x, blocksize=64, quant_type=qt, compress_statistics=False)
        for mode in ("ieee", "rcp", "divfull"):
            ours, am = encode(x, qt, 64, mode)
            res[(str(dt), qt, mode)] = (ours != p.view(-1)).sum().item()
for k, v in res.items():
    print("mismatched bytes", k, v)
# exhaustive mantissa table for rcp.approx
m = torch.arange(1 << 23, device="cuda", dtype=torch.int32) | (127 << 23)
x = m.view(torch.float32)
exact = (1.0 / x.double()).float()
for mode, name in ((0, "rcp.approx"), (1, "div.full")):
    a = rcp(x, mode)
    d = a.view(torch.int32).long() - exact.view(torch.int32).long()
    values, counts = torch.unique(d, return_counts=True)
    print(name, "ulp diff histogram", dict(zip(values.tolist(), counts.tolist(), strict=True)))
    if mode == 0:
        idx = (d != 0).nonzero().view(-1)
        torch.save({"mantissa": idx.int().cpu(), "delta": d[idx].to(torch.int8).cpu()}, f"{out}/rcp_exceptions.pt")
    # does the exponent only scale? check a few other binades
    for e in (-60, -20, 1, 20, 60, 125):
        xe = x * 2.0**e
        ae = rcp(xe, mode)
        print(name, "binade", e, "scales exactly:", torch.equal(ae, a * 2.0**-e))
