"""Dequantize: packed 4-bit codes + absmax -> fp32/fp16/bf16, one pass at copy speed.

Bytes moved per element: 0.5 read (codes) + 2 written (bf16) + absmax (1/blocksize byte with double quant),
so the floor is 2.5 bytes/param at device-copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4.kernels.common import flush, interpreted, load_absmax, round_to, run, scale_args

# Bytes of codes per program, from H200 sweeps (docs/BENCHMARKS_GPU.md): 64 bytes of codes a thread, enough in
# flight per SM to reach copy bandwidth, few enough per program to fill the GPU. 4096 bytes with 2 warps measured
# 1.13x the copy floor on a 28672x8192 weight (8192 / 4 warps: 1.17x, 4096 / 4: 1.28x, 8192 / 2: 2.5x), and
# was the fastest of these on five of kernels.py's six shapes.
_BYTES_PER_PROGRAM = 4096
_NUM_WARPS = 2


# A program decodes NB whole blocks; block b holds elements [b*BS, (b+1)*BS) and bytes [b*BS/2, (b+1)*BS/2).
#   byte j -> elements 2j (high nibble) and 2j+1 (low nibble)
#   value  = flush(fp32(quant_map[code] * absmax[b])) rounded once to the output dtype
# The pair is joined as the last axis of an [NB, BS/2, 2] tile and merged into [NB, BS]; masks
# are per block (constant along a block), which keeps the loads and stores 16 bytes wide. The last block,
# when partial, is a second launch (PARTIAL) masked per element.
@triton.jit
def _dequantize_kernel(
    data_ptr,
    absmax_ptr,
    quant_map_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    nested_offset_ptr,
    out_ptr,
    n,
    first_block,
    nblocks,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    PARTIAL: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # [NB]
    if PARTIAL:
        blk += first_block
    byte = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB]
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]  # [NB, BS]
    if PARTIAL:
        byte_mask = byte < (n + 1) // 2
        elem_mask = elem < n
    else:
        byte_mask = (blk < nblocks)[:, None]
        elem_mask = (blk < nblocks)[:, None]
    code = tl.load(data_ptr + byte, mask=byte_mask, other=0).to(tl.int32)
    absmax = load_absmax(
        absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, blk, blk < nblocks,
        DOUBLE_QUANT, INTERPRETED,
    )[:, None]  # fmt: skip
    hi = flush(tl.load(quant_map_ptr + (code >> 4)) * absmax)
    lo = flush(tl.load(quant_map_ptr + (code & 15)) * absmax)
    vals = tl.reshape(tl.join(hi, lo), (NB, BLOCKSIZE))  # [NB, HB, 2] -> [NB, BS]: byte j -> 2j, 2j + 1
    tl.store(out_ptr + elem, round_to(vals, out_ptr.dtype.element_ty, INTERPRETED), mask=elem_mask)


def dequantize(
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat ``[numel]`` tensor of ``dtype`` (written into ``out`` when given, e.g. a reused buffer)."""
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=data.device)
    nblocks = absmax.numel()
    full = numel // blocksize  # whole blocks; a partial last block is launched on its own
    nb = max(1, _BYTES_PER_PROGRAM // (blocksize // 2))
    double_quant = nested_absmax is not None
    args = (data, *scale_args(absmax, quant_map, nested_absmax, nested_quant_map, nested_offset), out, numel)
    consts = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, INTERPRETED=interpreted())
    if full:
        run(_dequantize_kernel, (triton.cdiv(full, nb),), *args, 0, full, NB=nb, PARTIAL=False, num_warps=_NUM_WARPS,
            **consts)  # fmt: skip
    if full < nblocks:
        run(_dequantize_kernel, (1,), *args, full, nblocks, NB=1, PARTIAL=True, num_warps=4, **consts)
    return out
