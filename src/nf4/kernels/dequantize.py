"""Dequantize: packed 4-bit codes + absmax -> fp32/fp16/bf16, one pass at copy speed.

Bytes moved per element: 0.5 read (codes) + 2 written (bf16) + absmax (1/blocksize byte with double quant),
so the floor is 2.5 bytes/param at device-copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from nf4.kernels.common import flush, interpreted, load_absmax, round_to

# Bytes of codes per program: enough in flight per SM to reach copy bandwidth, few enough programs to fill the GPU.
_BYTES_PER_PROGRAM = 4096


# A program decodes NB whole blocks; block b holds elements [b*BS, (b+1)*BS) and bytes [b*BS/2, (b+1)*BS/2).
#   byte j -> elements 2j (high nibble) and 2j+1 (low nibble)
#   value  = flush(fp32(quant_map[code] * absmax[b])) rounded once to the output dtype
@triton.jit
def _dequantize_kernel(
    data_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    nested_offset,
    out_ptr,
    n,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # [NB]
    byte = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB]
    code = tl.load(data_ptr + byte, mask=byte < (n + 1) // 2, other=0).to(tl.int32)
    absmax = load_absmax(
        absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset, blk, blk < nblocks,
        DOUBLE_QUANT, INTERPRETED,
    )[:, None]  # fmt: skip
    hi = flush(tl.load(quant_map_ptr + (code >> 4)) * absmax)
    lo = flush(tl.load(quant_map_ptr + (code & 15)) * absmax)
    vals = round_to(tl.reshape(tl.join(hi, lo), (NB, BLOCKSIZE)), out_ptr.dtype.element_ty, INTERPRETED)
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, vals, mask=elem < n)


def dequantize(
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: float,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat ``[numel]`` tensor of ``dtype`` (written into ``out`` when given, e.g. a reused buffer)."""
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=data.device)
    nblocks = absmax.numel()
    nb = max(1, _BYTES_PER_PROGRAM // (blocksize // 2))
    double_quant = nested_absmax is not None
    wrap_triton(_dequantize_kernel)[(triton.cdiv(nblocks, nb),)](
        data,
        absmax,
        quant_map,
        nested_absmax if double_quant else absmax,
        nested_quant_map if double_quant else quant_map,
        nested_offset,
        out,
        numel,
        nblocks,
        BLOCKSIZE=blocksize,
        NB=nb,
        DOUBLE_QUANT=double_quant,
        INTERPRETED=interpreted(),
        num_warps=8,
    )
    return out
