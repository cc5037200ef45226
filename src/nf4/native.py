"""Small C kernels for the CPU, compiled at first use and called through ctypes: no build step at install.

Why not TorchInductor (``nf4/cpu.py``) for dequantize: Inductor emits the 16-level table lookup as one scalar
load per element (~2.8 ns), slower than bitsandbytes' hand-written loop; ``csrc/kernels.c`` does 8 lookups
with one AVX2 register permute and runs at memory speed. ``matmul`` for a few rows of x (generation) decodes the
same way, 16 lookups a permute with AVX-512 where the CPU has it: the weight is read once as 4-bit, never written
out as floats. The library compiles with the
system C compiler (the one Inductor needs too) into a per-user cache, keyed by the source's hash, written to a
temporary name and renamed, so concurrent processes never load a half-written file. ``NF4_NO_COMPILE=1`` or no
compiler: the caller falls back to the other paths, which give the same values.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from nf4.format import QuantizedTensor

SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
MATMUL_MAX_M = 16  # csrc/kernels.c's accumulator count
# Weight parameters per thread of ``matmul``: a smaller call is quicker on the calling thread than handed to the
# pool, whose wake-ups cost ~0.1-0.3 ms on a 2-core VM (576x576 at one row: 0.17 ms alone, 0.43-0.46 ms on 2
# threads; 4096x4096: 4.3-4.7 ms on 2 threads, 6.3-6.6 alone). SmolLM2's matmuls (<= 0.9M) then run alone.
MATMUL_PARAMS_PER_THREAD = 1 << 20
_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    """nf4's per-user cache of derived files (``NF4_CACHE_DIR``, else ``$XDG_CACHE_HOME/nf4`` or ~/.cache/nf4)."""
    root = os.environ.get("NF4_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nf4"
    return Path(root)


def _compiler() -> str | None:
    return next((cc for cc in (os.environ.get("CC"), "cc", "gcc", "clang") if cc and shutil.which(cc)), None)


def _compile(cc: str, flags: list[str], target: Path) -> None:
    """Build to a temporary name in the cache, then rename: readers see no file or a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (the failure is reported once, as a warning)."""
    if os.environ.get("NF4_NO_COMPILE", "") not in ("", "0") or sys.byteorder != "little":
        return None
    cc = _compiler()
    if cc is None:
        return None
    flags = ["-O3", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"]  # no fused a*b+c: format.py's rounding
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if not target.exists():
        try:
            _compile(cc, flags, target)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = err.stderr if isinstance(err, subprocess.CalledProcessError) else err
            warnings.warn(f"nf4: could not compile {SOURCE.name} ({detail}); using the slower paths", stacklevel=2)
            return None
    lib = ctypes.CDLL(str(target))
    lib.nf4_dequantize.restype = None
    lib.nf4_dequantize.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int]
    lib.nf4_matmul.restype = None
    lib.nf4_matmul.argtypes = (
        [ctypes.c_void_p] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    )
    return lib


_HUGE = 1 << 21
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    fn = ctypes.CDLL(None).madvise
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty`` whose pages fault in 2 MiB at a time where the kernel allows it (Linux THP "madvise").

    A fresh 32 MiB output takes ~8k 4 KiB page faults on first write, measured at 25 ms on this kind of VM: more
    than the decode itself (7 ms). Only the 2 MiB-aligned interior of our own buffer is advised.
    """
    out = torch.empty(n, dtype=dtype)
    madvise = _madvise()
    if madvise is not None and out.nbytes >= 2 * _HUGE:
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        stop = (out.data_ptr() + out.nbytes) // _HUGE * _HUGE
        madvise(start, stop - start, _MADV_HUGEPAGE)  # a refusal (THP off) only costs the speed-up
    return out


def usable(codes: torch.Tensor, dtype: torch.dtype) -> bool:
    return codes.device.type == "cpu" and dtype in _KINDS and library() is not None


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, n: int, blocksize: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes (uint8, (n+1)//2) + fp32 absmax per block -> flat [n] of ``dtype``; see format.dequantize.

    Split over ``torch.get_num_threads()`` threads by whole blocks; ctypes releases the GIL during each call.
    """
    lib = library()
    assert lib is not None, "native.dequantize called where usable() is False"
    codes, absmax = codes.contiguous().view(-1), absmax.float().contiguous()
    levels = levels.float().contiguous()
    out = empty(n, dtype)
    args = (codes.data_ptr(), absmax.data_ptr(), levels.data_ptr())
    nblocks = -(-n // blocksize)
    threads = max(1, min(torch.get_num_threads(), nblocks * blocksize // (1 << 18)))
    bounds = [nblocks * t // threads * blocksize for t in range(threads)] + [n]

    def part(t: int) -> None:
        lib.nf4_dequantize(*args, bounds[t], bounds[t + 1], blocksize, out.data_ptr(), _KINDS[dtype])

    _run(part, threads)
    return out


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """Worker threads kept between calls (starting them cost more than a small call's work); one pool per process,
    as a forked child inherits the pool object but not its threads."""
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="nf4-native")


def _run(part: Callable[[int], None], threads: int) -> None:
    if threads == 1:
        part(0)
    else:
        list(_pool(os.getpid()).map(part, range(threads)))


def matmul_usable(x: torch.Tensor, q: QuantizedTensor) -> bool:
    """Whether ``matmul`` takes these: a CPU x of at most MATMUL_MAX_M rows and a 2-D weight, compiled kernels."""
    rows = x.numel() // max(1, x.shape[-1])
    return usable(q.data, x.dtype) and x.device.type == "cpu" and len(q.shape) == 2 and rows <= MATMUL_MAX_M


def _weight_args(q: QuantizedTensor) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    """``nf4_matmul``'s weight arguments for q: codes, the five scale tables, the levels. Kept on q when they are
    q's own tensors, not copies (so in-place updates show), and used again only while those tensors are where they
    were: a deep copy or an unpickled q carries the entry but not the memory. Building them cost ~2 us of the ~20 a
    small call took, and generation asks for the same weights every token. Returns (the arguments, the tensors they
    point into: the caller holds them through the call)."""
    own = (q.data, q.absmax, q.quant_map, q.nested_quant_map, q.nested_absmax)
    where = tuple(t.data_ptr() if t is not None else 0 for t in own)
    cached = q.__dict__.get("_native_args")
    if cached is not None and cached[0] == where:
        return cached[1:]
    codes, levels = q.data.contiguous(), q.quant_map.float().contiguous()
    if q.nested_absmax is None:  # (fp32 absmax, 8-bit absmax codes, nested map, nested absmax, offset)
        absmax = q.absmax.float().contiguous()
        tensors = (codes, absmax, levels)
        tables = (absmax.data_ptr(), 0, 0, 0, 0.0)
    else:
        codes8 = q.absmax.contiguous()
        nested_map, nested_absmax = q.nested_quant_map.float().contiguous(), q.nested_absmax.float().contiguous()
        tensors = (codes, codes8, nested_map, nested_absmax, levels)
        tables = (0, codes8.data_ptr(), nested_map.data_ptr(), nested_absmax.data_ptr(), float(q.nested_offset))
    args = (codes.data_ptr(), *tables, levels.data_ptr())
    if all(any(t is o for o in own) for t in tensors):
        q.__dict__["_native_args"] = (where, args, tensors)
    return args, tensors


def matmul(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(q).T + bias`` for a few rows of x, W read once as 4-bit (``csrc/kernels.c``).

    Computed in fp32 (x cast up, the weight values in fp32, as ``dequantize(q, torch.float32)``) and rounded to
    x's dtype once: for bf16 x, closer to the exact product than ``x @ dequantize(q, bf16).T``, which rounds every
    weight to bf16 first. Rows of W are split over ``torch.get_num_threads()`` threads. For ``matmul_usable``
    inputs only.
    """
    lib = library()
    assert lib is not None, "native.matmul called where matmul_usable() is False"
    n, k = q.shape
    if x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous():
        x2 = x  # generation's usual case: no reshape, cast or copy (each costs ~1 us)
    else:
        x2 = x.reshape(-1, k).float().contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    weight, held = _weight_args(q)  # held: copies made for this call live until it returns
    threads = max(1, min(torch.get_num_threads(), n * k // MATMUL_PARAMS_PER_THREAD))
    if threads == 1:
        lib.nf4_matmul(*weight, x2.data_ptr(), m, k, n, 0, n, q.blocksize, out.data_ptr())
    else:
        bounds = [n * t // threads for t in range(threads + 1)]

        def part(t: int) -> None:
            lib.nf4_matmul(*weight, x2.data_ptr(), m, k, n, bounds[t], bounds[t + 1], q.blocksize, out.data_ptr())

        _run(part, threads)
    if bias is not None:
        out += bias.float()
    if x.dtype != torch.float32:
        out = out.to(x.dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], n)
