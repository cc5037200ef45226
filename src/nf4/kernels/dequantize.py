"""Dequantize: packed 4-bit codes + absmax -> fp32/fp16/bf16, one pass at copy speed.

Bytes moved per element: 0.5 read (codes) + 2 written (bf16) + absmax (1/blocksize byte with double quant),
so the floor is 2.5 bytes/param at device-copy bandwidth.

A code byte is decoded where it was loaded and its two values leave as one word (bf16x2 / f16x2, or two fp32 as
one 64-bit word), so the tile keeps the layout of the bytes: no join of the two nibbles into an element tile,
which Triton did through shared memory. On the GPU the 16 levels sit in shared memory (64 bytes, a bank each: a
warp's lookups are broadcasts, never conflicts) and a byte's decode is inline PTX: two table loads, two products
flushed by ``mul.ftz`` then ``+ 0.0`` (a flushed negative product is -0, the reference's +0; adding +0 makes it
so), one conversion of the pair: ~6.5 instructions an element against ~12 for the element tile with a global
table load per element. H200, graph-timed (docs/BENCHMARKS.md, twenty-third session), over the copy floor:
4096x4096 1.43 -> 1.12, 14336x4096 1.24 -> 1.12, 8192x8192 1.22 -> 1.11, 28672x8192 1.13 -> 1.06; a kernel
that moves the same bytes with no decode at all takes 0.96 / 1.11 / 1.09 / 1.06. The interpreter computes the
same values with loads from ``quant_map`` and packs them by their bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nf4.kernels.common import ampere_or_newer, flush, interpreted, load_absmax, round_to, run, scale_args

# (bytes of codes, warps) a program. H200 sweep (512-8192 bytes, 1-4 warps): 4096 bytes on 4 warps fastest on
# weights under 2^25 elements (4096x4096 1.12x the floor against 1.16 at 1024 / 1), 1024 bytes on one warp from
# there (28672x8192 1.06 against 1.07-1.09).
SMALL_NUMEL = 1 << 25
_SMALL = (4096, 4)
_LARGE = (1024, 1)
_OUT_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


# The 16 levels into shared memory: the kernel's one ``.shared`` array, declared where this is inlined (once:
# one element a thread), written by threads 0-15, then a barrier before any lookup.
@triton.jit
def _levels(quant_map_ptr, THREADS: tl.constexpr):
    i = tl.arange(0, THREADS)
    level = tl.load(quant_map_ptr + (i & 15)).to(tl.int32, bitcast=True)
    tl.inline_asm_elementwise(
        ".shared .align 16 .b32 nf4_levels[16];"
        " { .reg .pred p; .reg .u32 a; setp.lt.u32 p, $1, 16; mov.u32 a, nf4_levels; mad.lo.u32 a, $1, 4, a;"
        " @p st.shared.b32 [a], $2; bar.sync 0; mov.b32 $0, 0; }",
        "=r,r,r", [i, level], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


# The fp32 values of code byte c (int32) in a block whose absmax is a, from quant_map: element 2j (high nibble) and
# 2j + 1 (low nibble), each level * absmax flushed.
@triton.jit
def _values(c, a, quant_map_ptr):
    return flush(tl.load(quant_map_ptr + (c >> 4)) * a), flush(tl.load(quant_map_ptr + (c & 15)) * a)


# Code byte c's two values (_values, each rounded once) as one word: bf16x2 / f16x2 (2j in the low half) or, for
# fp32, a 64-bit word (2j in the low 32 bits).
@triton.jit
def _decode(c, a, quant_map_ptr, OUT_KIND: tl.constexpr, PAIR_CVT: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        hi, lo = _values(c, a, quant_map_ptr)
        if OUT_KIND == 2:
            return (hi.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (
                lo.to(tl.int32, bitcast=True).to(tl.int64) << 32
            )
        else:
            dtype: tl.constexpr = tl.bfloat16 if OUT_KIND == 0 else tl.float16
            h16 = round_to(hi, dtype, INTERPRETED).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            l16 = round_to(lo, dtype, INTERPRETED).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            return h16 | (l16 << 16)
    else:
        lookup: tl.constexpr = (
            "{ .reg .u32 h, l, b; .reg .f32 x, y; mov.u32 b, nf4_levels;"
            " shr.u32 h, $1, 4; and.b32 l, $1, 15; shl.b32 h, h, 2; shl.b32 l, l, 2; add.u32 h, h, b;"
            " add.u32 l, l, b; ld.shared.f32 x, [h]; ld.shared.f32 y, [l];"
            " mul.ftz.f32 x, x, $2; mul.ftz.f32 y, y, $2; add.f32 x, x, 0f00000000; add.f32 y, y, 0f00000000;"
        )
        if OUT_KIND == 2:
            return tl.inline_asm_elementwise(lookup + " mov.b64 $0, {x, y}; }", "=l,r,r", [c, a], dtype=tl.int64,
                                             is_pure=False, pack=1)  # fmt: skip
        else:
            if PAIR_CVT:  # Ampere and newer: both values in one conversion
                cvt: tl.constexpr = (
                    " cvt.rn.bf16x2.f32 $0, y, x; }" if OUT_KIND == 0 else " cvt.rn.f16x2.f32 $0, y, x; }"
                )
            elif OUT_KIND == 1:
                cvt: tl.constexpr = (
                    " { .reg .b16 p, q; cvt.rn.f16.f32 p, x; cvt.rn.f16.f32 q, y; mov.b32 $0, {p, q}; } }"
                )
            else:  # bf16 before sm_80 (no bf16 cvt): round to nearest even on the bits (the values are finite)
                cvt: tl.constexpr = (
                    " { .reg .u32 u, v, r; mov.b32 u, x; mov.b32 v, y; shr.u32 r, u, 16; and.b32 r, r, 1;"
                    " add.u32 u, u, r; add.u32 u, u, 32767; shr.u32 r, v, 16; and.b32 r, r, 1; add.u32 v, v, r;"
                    " add.u32 v, v, 32767; prmt.b32 $0, u, v, 0x7632; } }"
                )
            return tl.inline_asm_elementwise(lookup + cvt, "=r,r,r", [c, a], dtype=tl.int32, is_pure=False, pack=1)


# A program decodes NB whole blocks: block b holds elements [b*BS, (b+1)*BS) and bytes [b*BS/2, (b+1)*BS/2), and
# byte j leaves as word j of out (out_ptr read as a pointer to such words). The last block, when partial, is a
# second launch (PARTIAL) masked per element, which writes out in its own dtype.
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
    OUT_KIND: tl.constexpr,
    PAIR_CVT: tl.constexpr,
    THREADS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    HB: tl.constexpr = BLOCKSIZE // 2
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # [NB]
    if PARTIAL:
        blk += first_block
    byte = blk[:, None] * HB + tl.arange(0, HB)[None, :]  # [NB, HB]
    if PARTIAL:
        code = tl.load(data_ptr + byte, mask=byte < (n + 1) // 2, other=0).to(tl.int32)
    else:
        code = tl.load(data_ptr + byte, mask=(blk < nblocks)[:, None], other=0).to(tl.int32)
    absmax = load_absmax(
        absmax_ptr, nested_absmax_ptr, nested_quant_map_ptr, nested_offset_ptr, blk, blk < nblocks,
        DOUBLE_QUANT, INTERPRETED,
    )[:, None]  # fmt: skip
    if PARTIAL:  # one program: elements past n masked one by one
        hi, lo = _values(code, absmax, quant_map_ptr)
        vals = tl.reshape(tl.join(hi, lo), (NB, BLOCKSIZE))  # [NB, HB, 2] -> [NB, BS]: byte j -> 2j, 2j + 1
        elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + elem, round_to(vals, out_ptr.dtype.element_ty, INTERPRETED), mask=elem < n)
    else:
        if not INTERPRETED:
            _levels(quant_map_ptr, THREADS)
        words_ptr = out_ptr.to(tl.pointer_type(tl.int64 if OUT_KIND == 2 else tl.int32))
        tl.store(words_ptr + byte, _decode(code, absmax, quant_map_ptr, OUT_KIND, PAIR_CVT, INTERPRETED),
                 mask=(blk < nblocks)[:, None])  # fmt: skip


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
    if out is not None and out.data_ptr() % (2 * dtype.itemsize):  # its words (a byte's 2 values) straddle: copy
        return out.copy_(dequantize(data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset,
                                    blocksize, numel, dtype))  # fmt: skip
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=data.device)
    nblocks = absmax.numel()
    full = numel // blocksize  # whole blocks; a partial last block is launched on its own
    bpp, warps = _SMALL if numel < SMALL_NUMEL else _LARGE
    nb = max(1, bpp // (blocksize // 2))
    double_quant = nested_absmax is not None
    scales = scale_args(absmax, quant_map, nested_absmax, nested_quant_map, nested_offset)
    consts = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=double_quant, OUT_KIND=_OUT_KIND[dtype],
                  PAIR_CVT=ampere_or_newer(out.device), INTERPRETED=interpreted())  # fmt: skip
    if full:
        run(_dequantize_kernel, (triton.cdiv(full, nb),), data, *scales, out, numel, 0, full, NB=nb, PARTIAL=False,
            THREADS=32 * warps, num_warps=warps, **consts)  # fmt: skip
    if full < nblocks:
        run(_dequantize_kernel, (1,), data, *scales, out, numel, full, nblocks, NB=1, PARTIAL=True, THREADS=128,
            num_warps=4, **consts)  # fmt: skip
    return out
