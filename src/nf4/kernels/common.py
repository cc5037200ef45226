"""Pieces shared by the kernels: exact fp32 arithmetic, the per-block absmax decode, the matmul launch."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.language.extra import libdevice

# Read once, as @triton.jit does when it wraps the kernels at import (an environment lookup costs ~1 us, and an
# eager matmul asks several times).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``, where libdevice calls do not exist (numpy rounds each op anyway)."""
    return _INTERPRETED


# The compiler contracts a * b + c into one fma (one rounding) unless the multiply is an explicit
# round-to-nearest instruction; the format rounds twice, so exact paths go through these helpers.
@triton.jit
def mul_rn(a, b, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


# 1 / x as bitsandbytes' fast-math CUDA kernels compute it: rcp.approx.ftz.f32 (within 1 ulp, not correctly
# rounded). Interpreted, it is rebuilt as format does: 1/x correctly rounded, moved by the tabulated ulp
# deviation of x's mantissa (rcp_delta_ptr, int32 [2**23]); 0 -> inf, x > 2**126 -> 0 (flushed).
@triton.jit
def reciprocal_approx(x, rcp_delta_ptr, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        bits = (1.0 / x).to(tl.int32, bitcast=True)
        bits += tl.load(rcp_delta_ptr + (x.to(tl.int32, bitcast=True) & 0x7FFFFF))
        r = bits.to(tl.float32, bitcast=True)
        r = tl.where(x == 0, float("inf"), r)
        return tl.where(x > 2.0**126, 0.0, r).to(tl.float32)
    else:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )


# Subnormal fp32 -> 0, as the fast-math (FTZ) code that wrote the reference bytes does.
@triton.jit
def flush(x):
    return tl.where(tl.abs(x) < 1.1754943508222875e-38, 0.0, x).to(tl.float32)


# absmax of 4-bit block b (any int tensor of block indices, masked lanes read block 0):
#   plain:        absmax[b]                                               (fp32)
#   double quant: flush(nested_quant_map[absmax[b]] * nested_absmax[b // 256]) + offset   (two fp32 roundings)
# The offset is read from memory (a 0-d fp32 tensor), not passed by value: a per-weight Python float would make
# torch.compile specialize the graph on it, one compile per layer. In two halves, so that a loop can issue the
# stored bytes' loads (absmax_raw) a step before it needs the value (absmax_decode, whose table lookup hits L1).
@triton.jit
def absmax_raw(absmax_ptr, nested_absmax_ptr, b, mask, DOUBLE_QUANT: tl.constexpr):
    """Block b's stored absmax: (8-bit code, nested scale) with double quant, else (fp32 absmax, the same)."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + b, mask=mask, other=0).to(tl.int32)
        return code, tl.load(nested_absmax_ptr + b // 256, mask=mask, other=0.0)
    else:
        absmax = tl.load(absmax_ptr + b, mask=mask, other=0.0)
        return absmax, absmax


@triton.jit
def absmax_decode(
    code, scale, nested_quant_map_ptr, nested_offset_ptr, DOUBLE_QUANT: tl.constexpr, INTERPRETED: tl.constexpr
):
    """The fp32 absmax from absmax_raw's pair."""
    if DOUBLE_QUANT:
        return flush(mul_rn(tl.load(nested_quant_map_ptr + code), scale, INTERPRETED)) + tl.load(nested_offset_ptr)
    else:
        return code


@triton.jit
def load_absmax(
    absmax_ptr,
    nested_absmax_ptr,
    nested_quant_map_ptr,
    nested_offset_ptr,
    b,
    mask,
    DOUBLE_QUANT: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    code, scale = absmax_raw(absmax_ptr, nested_absmax_ptr, b, mask, DOUBLE_QUANT)
    return absmax_decode(code, scale, nested_quant_map_ptr, nested_offset_ptr, DOUBLE_QUANT, INTERPRETED)


# fp32 -> out_ptr's dtype, rounded to nearest even. The interpreter's own bf16 cast truncates, so there the
# rounding is done on the bits: add 0x7FFF plus the lowest kept bit, keep the high half (finite inputs only).
@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# The end of a fused matmul program: its fp32 tile result [BLOCK_N, BLOCK_M] of rows x mcol goes to out [M, N]
# (+ bias, rounded to out's dtype). Split over K, each program stores its slice's sum to partial [SPLIT_K, M, N];
# the slices are then added in slice order (so the result does not depend on which finished first), either
# - SUM_IN_KERNEL: by the row tile's last program to finish. Each program takes a ticket from its tile's counter
#   after storing; the one that draws the last ticket sums, stores the tile and sets the counter back to 0 for the
#   next launch. One launch less per matmul: the decode kernel's choice (gemv.py), whose tiles are small; or
# - by _split_k_sum_kernel, launched after (sum_slices): the tensor-core kernel's choice (mma.py), whose tiles are
#   large (128 x 16 x 16 slices = 128 KB read by one program: 8-15% slower at M = 16 on 8192x28672 and the 8B
#   MLPs), and gemv_tc.py's on large weights, which is persistent (a ticket's fences at each item's end waited on
#   the next item's prefetched codes: 18% slower on 28672x8192, 0.0692 against 0.0586 ms; its small weights take
#   their tickets once the program's items are done, sum_tiles below).
@triton.jit
def store_tile(
    result, rows, mcol, M, N, bias_ptr, out_ptr, partial_ptr, counter_ptr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, SUM_IN_KERNEL: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    mask = (rows < N)[:, None] & (mcol < M)[None, :]
    offsets = mcol[None, :] * N + rows[:, None]
    if SPLIT_K == 1:
        _store_out(result, rows, N, offsets, mask, bias_ptr, out_ptr, HAS_BIAS, INTERPRETED)
    else:
        tl.store(partial_ptr + tl.program_id(1) * M * N + offsets, result, mask=mask)
        if SUM_IN_KERNEL:
            tl.debug_barrier()  # the whole tile is stored before the ticket is taken
            ticket = tl.atomic_add(counter_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT_K - 1:
                _sum_tile(rows, offsets, mask, M, N, bias_ptr, out_ptr, partial_ptr, counter_ptr + tl.program_id(0),
                          HAS_BIAS, SPLIT_K, INTERPRETED)  # fmt: skip


# A row tile's split-K sum, by the program that drew its last ticket: the slices of partial [SPLIT_K, M, N] added in
# slice order (deterministic), the bias, the rounded store, and the tile's counter back to 0 for the next launch.
@triton.jit
def _sum_tile(rows, offsets, mask, M, N, bias_ptr, out_ptr, partial_ptr, counter, HAS_BIAS: tl.constexpr,
              SPLIT_K: tl.constexpr, INTERPRETED: tl.constexpr):  # fmt: skip
    result = tl.zeros(offsets.shape, tl.float32)
    for s in tl.static_range(SPLIT_K):  # past L1: the other slices were written by other SMs
        result += tl.load(partial_ptr + s * M * N + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    _store_out(result, rows, N, offsets, mask, bias_ptr, out_ptr, HAS_BIAS, INTERPRETED)
    tl.atomic_xchg(counter, 0)


@triton.jit
def _store_out(result, rows, N, offsets, mask, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr):
    if HAS_BIAS:
        result += tl.load(bias_ptr + tl.minimum(rows, N - 1)).to(tl.float32)[:, None]
    tl.store(out_ptr + offsets, round_to(result, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


# out[i] = sum over the SPLIT_K slices of partial[:, i] (+ bias[i % N]), in slice order, rounded once.
@triton.jit
def _split_k_sum_kernel(
    partial_ptr, bias_ptr, out_ptr, numel, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    total = tl.zeros((BLOCK,), tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + s * numel + i, mask=mask, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + i % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, round_to(total, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


# Split-K's sum inside a persistent kernel, once the program's items are done (no loads in flight then, so the
# fences cost little; a ticket at each item's end waited on the next item's prefetched codes): a ticket per item's
# row tile, and the program that draws a tile's last sums its BLOCK_N x M outputs (_sum_tile; XR: a power of two
# >= M). Saves the second launch that sum_slices costs.
@triton.jit
def sum_tiles(
    pid, G, n_tiles, N, M, partial_ptr, counter_ptr, bias_ptr, out_ptr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    XR: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    J: tl.constexpr = 8  # tickets taken at once
    mcol = tl.arange(0, XR)
    n_items = tl.cdiv(n_tiles * SPLIT_K - pid, G)
    tl.debug_barrier()  # every row of the program's items is stored before its tickets are taken
    for j0 in range(0, n_items, J):
        jj = j0 + tl.arange(0, J)
        tickets = tl.atomic_add(counter_ptr + (pid + jj * G) % n_tiles, 1, mask=jj < n_items, sem="acq_rel",
                                scope="gpu")  # fmt: skip
        for j in range(0, tl.minimum(J, n_items - j0)):
            ticket = tl.sum(tl.where(tl.arange(0, J) == j, tickets, 0))
            if ticket == SPLIT_K - 1:
                tile = (pid + (j0 + j) * G) % n_tiles
                rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                mask = (rows < N)[:, None] & (mcol < M)[None, :]
                _sum_tile(rows, mcol[None, :] * N + rows[:, None], mask, M, N, bias_ptr, out_ptr, partial_ptr,
                          counter_ptr + tile, HAS_BIAS, SPLIT_K, INTERPRETED)  # fmt: skip


# Zeroed buffers (split-K's row-tile counters, the double quant's sums and ticket), one per (use, device, stream):
# the kernels using one leave it at 0 and kernels of one stream run one after another, so each finds it zeroed
# without a memset a launch. A CUDA graph keeps the buffers of the stream it was captured on, so graphs captured
# on one stream must not be replayed concurrently (on several streams at once). Buffers outgrown stay referenced:
# a captured graph may still point at them.
_ZEROED: dict[tuple[str, torch.device, int], torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def tracing() -> bool:
    """Under torch.compile: dynamo tracing the caller, or Inductor running an op's implementation on fake tensors
    (where ``is_compiling()`` is False). No kernel runs then, and no cached device tensor may enter the graph."""
    return torch.compiler.is_compiling() or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


@functools.cache
def programs(device: torch.device, per_sm: int) -> int:
    """Programs that run at once: per_sm on each SM (on CPU, under the interpreter, as if on one SM). Cached:
    ``get_device_properties`` costs ~15 us a call."""
    if device.type != "cuda":
        return per_sm
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


@functools.cache
def ampere_or_newer(device: torch.device) -> bool:
    """Whether the table kernels' inline PTX runs on device: ``mma.sync.m16n8k16`` in bf16/fp16 and ``cp.async``
    need compute capability 8.0, so ptxas rejects them for a T4 or a V100 (offline, sm_75 and sm_70: every other
    kernel compiles there; tests/test_sass.py). CPU tensors (the interpreter) take them. Cached: a decode step asks
    often."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.cache
def hopper_or_newer(device: torch.device) -> bool:
    """Whether device takes programmatic dependent launch (``griddepcontrol``: compute capability 9.0), which lets
    a launch start while the kernel before it finishes. Compiled kernels only: not under the interpreter."""
    return device.type == "cuda" and not _INTERPRETED and torch.cuda.get_device_capability(device) >= (9, 0)


# Direct launches (``run``) are written against the launcher of Triton 3.6-3.9 (tested on both); earlier versions,
# whose launch path and hooks differ (no ``triton.knobs`` before 3.4), always launch through Triton.
_DIRECT = tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 6)


def _hooked() -> bool:
    """A launch hook is installed (Triton 3.6+ holds them in a chain, empty by default; a callable or None before),
    or this Triton's launcher is not the one ``run`` calls directly."""
    if not _DIRECT:
        return True
    hook = triton.knobs.runtime.launch_enter_hook
    return hook is not None and bool(getattr(hook, "calls", True))


# Compiled kernels by launch: (the kernel's id, grid, device, constexprs and options, what Triton specializes the
# arguments on) -> (the compiled kernel, its constexprs in parameter order).
_LAUNCHES: dict[tuple, tuple] = {}


def run(kernel: triton.JITFunction, grid: tuple[int, ...], *args: object, **consts: object) -> None:
    """``kernel[grid](*args, **consts)`` (positional arguments, then constexprs and launch options by name).

    In eager mode on the GPU the compiled kernel is looked up by what decides it (the grid, the constexprs and
    options, each tensor's dtype and 16-byte alignment, each int's value) and launched directly: Triton's own path
    binds and specializes every argument again at each launch (~25 us of host time against ~10 us for the launch
    itself), and a decode step makes hundreds of launches. Traced, interpreted or with a launch hook installed
    (a profiler), it goes through ``wrap_triton`` as before.
    """
    if _INTERPRETED or tracing() or _hooked():
        wrap_triton(kernel)[grid](*args, **consts)
        return
    device = args[0].device.index  # every kernel's first argument is a tensor
    spec = tuple((a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args)
    key = (id(kernel), grid, device, tuple(consts.items()), spec)  # id: a JITFunction hashes its source
    entry = _LAUNCHES.get(key)
    if entry is None:
        compiled = kernel[grid](*args, **consts)
        # the constexprs in the kernel's parameter order, for the launcher (it takes every parameter); a tensor or
        # int given by name would be missing from the key
        assert all(p.is_constexpr for p in kernel.params[len(args) :]), kernel.arg_names
        tail = tuple(consts[p.name] if p.name in consts else p.default for p in kernel.params[len(args) :])
        _LAUNCHES[key] = (compiled, tail)
        return
    compiled, tail = entry
    g = grid + (1, 1)
    compiled.run(g[0], g[1], g[2], torch._C._cuda_getCurrentRawStream(device), compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *tail)  # fmt: skip


def stream_zeros(use: str, device: torch.device, n: int, dtype: torch.dtype) -> torch.Tensor:
    """At least ``n`` zeros of ``dtype``, this stream's buffer for ``use``, which the kernels using it return to
    zero (see _ZEROED)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buffer = _ZEROED.get((use, device, stream))
    if buffer is None or buffer.numel() < n:
        if buffer is not None:
            _OUTGROWN.append(buffer)
        buffer = torch.zeros(n, dtype=dtype, device=device)
        _ZEROED[(use, device, stream)] = buffer
    return buffer


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """int32 zeros, at least ``tiles`` of them, that split-K kernels return to zero. Traced by torch.compile, a
    fresh zeroed tensor: a compiled graph holds no state of its own."""
    if tracing():
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    return stream_zeros("split-K tile counters", device, max(tiles, 1 << 16), torch.int32)


def scale_args(
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """The five scale arguments of a kernel; without double quant the nested ones are stand-ins (tensors the
    kernel's DOUBLE_QUANT=False never reads: a Triton pointer argument cannot be None)."""
    if nested_absmax is None:
        return absmax, quant_map, absmax, quant_map, absmax
    return absmax, quant_map, nested_absmax, nested_quant_map, nested_offset


def launch(
    kernel: triton.JITFunction,
    x: torch.Tensor,
    dtype: torch.dtype,
    k: int,
    qargs: tuple,
    n: int,
    bias: torch.Tensor | None,
    block_n: int,
    split_k: int,
    num_warps: int,
    sum_in_kernel: bool,
    **consts: object,
) -> torch.Tensor:
    """Run a fused matmul kernel (gemv.py, mma.py: the same leading arguments) over (row tiles, split_k slices) and
    sum the slices (store_tile: in the kernel, or by a second one): -> out [M, n] of ``dtype``. x is the kernel's
    view of x [M, k] (unit column stride; gemv reads it as int32 words)."""
    data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize = qargs
    m = x.shape[0]
    tiles = triton.cdiv(n, block_n)
    out = torch.empty((m, n), dtype=dtype, device=x.device)
    if split_k > 1:
        partial = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, tiles) if sum_in_kernel else partial
    else:  # stand-ins the kernel does not read
        partial, counters = out, out
    double_quant = nested_absmax is not None
    run(
        kernel,
        (tiles, split_k),
        x,
        data,
        *scale_args(absmax, quant_map, nested_absmax, nested_quant_map, nested_offset),
        bias if bias is not None else out,
        out,
        partial,
        counters,
        m,
        n,
        k,
        x.stride(0),
        BLOCKSIZE=blocksize,
        DOUBLE_QUANT=double_quant,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        SPLIT_K=split_k,
        SUM_IN_KERNEL=sum_in_kernel,
        INTERPRETED=interpreted(),
        num_warps=num_warps,
        **consts,
    )
    if split_k > 1 and not sum_in_kernel:
        sum_slices(partial, bias, out)
    return out


def sum_slices(partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [M, N] = the sum of partial [SPLIT_K, M, N] over its slices in slice order (+ bias), rounded once."""
    split_k, numel, n = partial.shape[0], out.numel(), out.shape[-1]
    block = 1024
    run(
        _split_k_sum_kernel, (triton.cdiv(numel, block),), partial, bias if bias is not None else out, out, numel, n,
        SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block, INTERPRETED=_INTERPRETED, num_warps=4,
    )  # fmt: skip
