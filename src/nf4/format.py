"""The NF4 format, as a pure-PyTorch reference: quantize, dequantize, double quantization, packing.

This module is the spec. Every fast path (Triton, CPU) is tested against it, and its bytes equal those of
bitsandbytes' CUDA path, which writes the real checkpoints.

Layout of a tensor of ``n`` elements, flattened in row-major order::

    blocks      n elements split into ceil(n / blocksize) blocks; the last block may be partial
    absmax      one fp32 per block: max |x| over the block's elements
    codes       c_i = nearest level to x_i / absmax (x_i times fp32 1/absmax), ties to the lower code
    data        uint8 [(n + 1) // 2, 1]; byte j = (c_{2j} << 4) | c_{2j+1}
                  (first element in the HIGH nibble; an odd n pads the last low nibble with the code of 0)
    double quant (optional): absmax is itself quantized
      offset          fp32 scalar, mean(absmax) (computed in float64, rounded once: same on every device)
      nested_absmax   fp32 [ceil(nblocks / 256)], max |absmax - offset| per block of 256
      absmax (uint8)  8-bit codes of (absmax - offset) / nested_absmax in bitsandbytes' signed dynamic map
      decode          absmax_i = dyn[q_i] * nested_absmax[i // 256] + offset   (two fp32 roundings)

    value_i = level[c_i] * absmax[i // blocksize]   (fp32 product, rounded once to the output dtype)

bitsandbytes' CUDA kernels, which wrote the checkpoints, are built with fast math, and the bytes show it:
  - 1/absmax is the GPU's rcp.approx.ftz.f32 (within 1 ulp of the true reciprocal, not correctly rounded);
    we reproduce it from a table of its per-mantissa deviation, measured exhaustively on an H200
    (``rcp_approx.bin``, tests/golden/probe_rcp.py);
  - subnormal fp32 values (inputs, products) are flushed to zero.
An all-zero block has absmax 0; the kernel then compares NaN (0 * 1/0) with every threshold, which is
false, so every code in the block is 0. We follow that rule (bitsandbytes' CPU path writes 7).
Bits per parameter: 4 + 32/blocksize, or 4 + 8/blocksize + 32/(256 blocksize) with double quant.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.resources import files

import torch

from nf4 import codebook, cpu, native

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements quantized per step: bounds the float32 temporaries (a few MiB) whatever the tensor's size.
CHUNK_ELEMENTS = 1 << 18

FLT_MIN = 2.0**-126  # smallest normal fp32: anything smaller is flushed to zero, as on the GPU
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class FormatError(ValueError):
    """Input that the format cannot represent, or a serialized state that is not a valid one."""


@dataclass(frozen=True)
class QuantizedTensor:
    """A blockwise 4-bit tensor: packed codes plus the quant state, with bitsandbytes' names.

    Attributes:
        data: uint8 ``[(n + 1) // 2, 1]``, two codes a byte, first in the high nibble.
        absmax: fp32 ``[nblocks]``, or uint8 ``[nblocks]`` codes when double-quantized.
        quant_map: fp32 ``[16]``, the level of each code.
        quant_type: ``"nf4"``, ``"fp4"`` or ``"int4"``.
        blocksize: elements per block.
        shape, dtype: the original tensor's.
        nested_absmax: fp32 ``[ceil(nblocks / 256)]`` (double quant only).
        nested_quant_map: fp32 ``[256]``, the signed dynamic map (double quant only).
        nested_offset: the mean that was subtracted from absmax (double quant only).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    quant_type: str
    blocksize: int
    shape: torch.Size
    dtype: torch.dtype
    nested_absmax: torch.Tensor | None = None
    nested_quant_map: torch.Tensor | None = None
    nested_offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales (the code tables, 64 B and 1 KiB shared by all tensors, excluded)."""
        n = self.data.nbytes + self.absmax.nbytes
        if self.nested_absmax is not None:
            n += self.nested_absmax.nbytes + 4  # + the fp32 offset
        return n

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.numel()

    def to(self, device: torch.device | str) -> QuantizedTensor:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            data=move(self.data),
            absmax=move(self.absmax),
            quant_map=move(self.quant_map),
            nested_absmax=move(self.nested_absmax),
            nested_quant_map=move(self.nested_quant_map),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def absmax_fp32(self) -> torch.Tensor:
        """The per-block absmax as fp32, decoding the double quantization if there is one."""
        if self.nested_absmax is None:
            return self.absmax
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        return _flush(self.nested_quant_map[self.absmax.long()] * scale) + torch.tensor(
            self.nested_offset, dtype=torch.float32, device=self.absmax.device
        )

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors that transformers + bitsandbytes write for a 4-bit weight, keys included.

        Example:
            >>> q = nf4.quantize(torch.randn(64, 64))
            >>> sorted(q.state_dict())[:2]
            ['weight', 'weight.absmax']
        """
        out = {prefix: self.data, f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.quant_map}
        meta: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.nested_absmax is not None:
            out[f"{prefix}.nested_absmax"] = self.nested_absmax
            out[f"{prefix}.nested_quant_map"] = self.nested_quant_map
            meta |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32"}
            meta["nested_offset"] = self.nested_offset
        blob = json.dumps(meta).encode("utf-8")
        out[f"{prefix}.{_state_key(self.quant_type)}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> QuantizedTensor:
        """Rebuild from ``state_dict()`` output or a transformers + bitsandbytes checkpoint's tensors.

        Raises:
            FormatError: missing keys, wrong dtypes, sizes that disagree with the stated shape, bad JSON.
        """
        return _from_state_dict(state, prefix)


def _state_key(quant_type: str) -> str:
    # bitsandbytes' loaders look for "quant_state.bitsandbytes__<type>"; our own formats get their own
    # namespace so that no loader mistakes them for bitsandbytes' formats.
    owner = "bitsandbytes" if quant_type in codebook.BNB_QUANT_TYPES else "nf4"
    return f"quant_state.{owner}__{quant_type}"


# --------------------------------------------------------------------------------------------- quantize


def _check_tensor(tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise FormatError(f"cannot quantize a {tensor.dtype} tensor; expected float32, float16 or bfloat16")
    if tensor.numel() == 0:
        raise FormatError(f"cannot quantize an empty tensor (shape {tuple(tensor.shape)})")


def _check_options(quant_type: str, blocksize: int) -> None:
    if quant_type not in codebook.CODEBOOKS:
        raise FormatError(f"unknown quant_type {quant_type!r}; expected one of {sorted(codebook.CODEBOOKS)}")
    if blocksize not in BLOCKSIZES:
        raise FormatError(f"unsupported blocksize {blocksize!r}; expected one of {BLOCKSIZES}")


def _encode_4bit(y: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Codes (int32) of scaled values y in [-1, 1]; NaN (an all-zero block) gives code 0."""
    if quant_type == "fp4":
        # Sign-magnitude, as bitsandbytes: magnitude rank by strict '>' on |y|, sign bit for y < 0.
        thresholds = torch.tensor(codebook.FP4_MAGNITUDE_THRESHOLDS, device=y.device)
        rank = torch.bucketize(y.abs(), thresholds, out_int32=True)
        rank.masked_fill_(y.isnan(), 0)
        code = torch.tensor(codebook.FP4_CODE_OF_RANK, dtype=torch.int32, device=y.device)[rank]
        return code | ((y < 0).int() << 3)  # y is flushed: a subnormal negative is +0 here, as on the GPU
    # Ascending levels: the code is the number of thresholds strictly below y, so a tie goes to the
    # lower code. bucketize(right=False) returns exactly #{t : t < y}.
    code = torch.bucketize(y, _thresholds(quant_type, y.device), out_int32=True)
    return code.masked_fill_(y.isnan(), 0)


_THRESHOLDS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _thresholds(quant_type: str, device: torch.device) -> torch.Tensor:
    key = (quant_type, device)
    if key not in _THRESHOLDS:
        lv = torch.tensor(sorted(set(codebook.CODEBOOKS[quant_type])), dtype=torch.float32)
        _THRESHOLDS[key] = codebook.midpoints(lv).to(device)
    return _THRESHOLDS[key]


_RCP_DELTA: dict[torch.device, torch.Tensor] = {}


def _rcp_delta(device: torch.device) -> torch.Tensor:
    """int32 [2**23]: ulps that rcp.approx.ftz.f32 adds to the correctly rounded 1/m, per fp32 mantissa m."""
    if device not in _RCP_DELTA:
        raw = zlib.decompress((files("nf4") / "rcp_approx.bin").read_bytes())
        _RCP_DELTA[device] = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int32) - 1).to(device)
    return _RCP_DELTA[device]


def _reciprocal(a: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of fp32 a >= 0, bit for bit: 1/a correctly rounded, then moved by the tabulated
    deviation (-1, 0 or +1 ulp) of a's mantissa; the exponent only scales. 0 -> inf; a > 2**126 -> 0
    (the subnormal result is flushed)."""
    delta = _rcp_delta(a.device)[(a.view(torch.int32) & 0x7FFFFF).long()]
    r = (torch.reciprocal(a).view(torch.int32) + delta).view(torch.float32)
    r = torch.where(a == 0, math.inf, r)
    return torch.where(a > 2.0**126, 0.0, r)


def _check_finite(absmax: torch.Tensor) -> None:
    """NaN and Inf both survive max |x|: one cheap check per block instead of one per element."""
    if not torch.isfinite(absmax).all():
        bad = (~torch.isfinite(absmax)).nonzero()[0, 0].item()
        raise FormatError(f"cannot quantize NaN or Inf values (found in block {bad})")


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Flush subnormals to zero, as fast-math GPU code does."""
    return x.masked_fill(x.abs() < FLT_MIN, 0.0)


def _quantize_blocks(x: torch.Tensor, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [nblocks, blocksize] (a partial block zero-padded) -> (codes int32 like x, absmax fp32 [nblocks])."""
    x = _flush(x)
    absmax = x.abs().amax(dim=1)
    _check_finite(absmax)
    # bitsandbytes multiplies by the (approximate) reciprocal rather than dividing: the rounding matters.
    y = _flush(x * _reciprocal(absmax).unsqueeze(1))
    return _encode_4bit(y, quant_type), absmax


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """Even-length codes -> uint8 bytes, the first code of each pair in the high nibble."""
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)


def _quantize_step(x: torch.Tensor, quant_type: str, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk [rows, blocksize] -> (packed bytes, absmax): the compiled CPU path if asked, else the spec."""
    if fused:
        try:
            return cpu.quantize_blocks(x, quant_type)
        except FormatError:
            raise
        except Exception as err:  # a compiler problem: warn once, then the eager path gives the same bytes
            cpu.disable(err)
    codes, absmax = _quantize_blocks(x.float(), quant_type)
    return _pack(codes.view(-1)), absmax


def quantize(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """Quantize a float tensor to a blockwise 4-bit format, byte-identical to bitsandbytes' CUDA path.

    Works in chunks of ``CHUNK_ELEMENTS``, so memory beyond the output stays a few MiB.

    Args:
        tensor: fp32, fp16 or bf16, any shape, finite values.
        quant_type: ``"nf4"`` (default), ``"fp4"`` (bitsandbytes') or ``"int4"`` (symmetric, ours).
        blocksize: one of ``BLOCKSIZES``; 64 is QLoRA's.
        double_quant: store absmax in 8 bits as well (~4.127 bits/param at blocksize 64).

    Returns:
        A ``QuantizedTensor`` on the input's device.

    Example:
        >>> q = nf4.quantize(torch.randn(4096, 4096, dtype=torch.bfloat16))
        >>> round(q.bits_per_param, 3)
        4.127
    """
    _check_tensor(tensor)
    _check_options(quant_type, blocksize)
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=flat.device)
    fused = cpu.usable(flat)
    step = max((CHUNK_ELEMENTS * (16 if fused else 1)) // blocksize, 1) * blocksize
    for start in range(0, n, step):
        chunk = flat[start : start + step]
        if chunk.numel() % blocksize:
            chunk = torch.nn.functional.pad(chunk, (0, blocksize - chunk.numel() % blocksize))
        valid = min(step, n - start)
        packed, amax = _quantize_step(chunk.view(-1, blocksize), quant_type, fused)
        data[start // 2 : (start + valid + 1) // 2, 0] = packed[: (valid + 1) // 2]
        absmax[start // blocksize : start // blocksize + amax.numel()] = amax
    q = QuantizedTensor(
        data=data,
        absmax=absmax,
        quant_map=_levels(quant_type, flat.device),
        quant_type=quant_type,
        blocksize=blocksize,
        shape=tensor.shape,
        dtype=tensor.dtype,
    )
    return double_quantize(q) if double_quant else q


# ------------------------------------------------------------------------------------ double quantization

_DYNAMIC_MAP: dict[torch.device, torch.Tensor] = {}
_LEVELS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _levels(quant_type: str, device: torch.device) -> torch.Tensor:
    """A fresh copy of the 16 levels on ``device``, cloned from one kept per device: a device-to-device copy, where
    building them on the host and copying them over waited on the host (~10-20 us a quantize on a GPU)."""
    key = (quant_type, device)
    if key not in _LEVELS:
        _LEVELS[key] = codebook.levels(quant_type).to(device)
    return _LEVELS[key].clone()


def _dynamic_map(device: torch.device) -> torch.Tensor:
    if device not in _DYNAMIC_MAP:
        _DYNAMIC_MAP[device] = codebook.dynamic_map_signed().to(device)
    return _DYNAMIC_MAP[device]


def _encode_8bit(y: torch.Tensor, dyn: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 8-bit encoder: a 7-step binary search over the 256-entry map, then a midpoint test.

    Not plain nearest rounding: the search ends on a pivot in 0..254 with its last neighbours on each side,
    and y goes to the upper (lower) neighbour only if strictly beyond the midpoint. NaN gives code 0.
    """
    pivot = torch.full_like(y, 127, dtype=torch.int64)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = dyn[0].expand_as(y)
    upper = dyn[255].expand_as(y)
    val = dyn[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = y > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = dyn[pivot]
    above = torch.where(y > (upper + val) * 0.5, upper_pivot, pivot)
    below = torch.where(y < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(y > val, above, below).to(torch.uint8)


def mean_offset(absmax: torch.Tensor) -> torch.Tensor:
    """The double-quant offset, fp32 0-d: the float64 sum of absmax (read once, no float64 copy) over its count,
    rounded once. The sum is exact, so the same in every order (device, reduction), while absmax spans less than
    2**29 / count in magnitude; beyond that two orders can differ in the sum's last bits, which the rounding to
    fp32 hides but for a ~2**-29 chance."""
    return (absmax.sum(dtype=torch.float64) / absmax.numel()).float()


def double_quantize(q: QuantizedTensor) -> QuantizedTensor:
    """Store a QuantizedTensor's fp32 absmax as 8-bit codes (blocks of 256, mean offset)."""
    if q.double_quant:
        return q
    absmax = q.absmax
    offset = mean_offset(absmax)
    centered = absmax - offset
    nb = centered.numel()
    padded = torch.nn.functional.pad(centered, (0, -nb % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    padded = _flush(padded)
    nested_absmax = padded.abs().amax(dim=1)
    y = _flush(padded * _reciprocal(nested_absmax).unsqueeze(1))
    dyn = _dynamic_map(absmax.device)
    encode = cpu.encode_8bit if cpu.usable(y, cpu.ENCODE_8BIT_MIN_ELEMENTS) else _encode_8bit
    codes = encode(y, dyn).view(-1)[:nb]
    return replace(q, absmax=codes, nested_absmax=nested_absmax, nested_quant_map=dyn, nested_offset=offset.item())


def concat(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Stack 2-D quantized weights by rows, ``[N_i, K] -> [sum N_i, K]``: one matmul for layers that read the
    same input (q/k/v, gate/up), one launch instead of several at decode.

    The codes are the parts' bytes. Without double quant so is absmax, and the result dequantizes to the parts'
    values exactly. With it, one offset must serve all parts: their absmax, each decoded with its own offset, are
    double-quantized again, so the codes stay and each absmax moves by at most half a step of the 8-bit map.
    """
    if not parts:
        raise ValueError("concat needs at least one quantized tensor")
    first = parts[0]
    want = (first.quant_type, first.blocksize, first.dtype, first.double_quant, first.device)
    for i, q in enumerate(parts):
        if len(q.shape) != 2 or q.shape[1] != first.shape[1]:
            raise ValueError(
                f"part {i} has shape {tuple(q.shape)}; every part must be 2-D with {first.shape[1]} columns"
            )
        if q.numel() % q.blocksize:
            raise ValueError(
                f"part {i} ({tuple(q.shape)}) ends inside a block of {q.blocksize}: a block would span two parts"
            )
        same = (q.quant_type, q.blocksize, q.dtype, q.double_quant, q.device)
        if same != want:
            raise ValueError(f"part {i} has (quant_type, blocksize, dtype, double_quant, device) {same}, part 0 {want}")
        if not torch.equal(q.quant_map, first.quant_map):
            raise ValueError(f"part {i} has another code table than part 0")
    if len(parts) == 1:
        return first
    fused = QuantizedTensor(
        data=torch.cat([q.data for q in parts]),
        absmax=torch.cat([q.absmax_fp32() for q in parts]),
        quant_map=first.quant_map,
        quant_type=first.quant_type,
        blocksize=first.blocksize,
        shape=torch.Size((sum(q.shape[0] for q in parts), first.shape[1])),
        dtype=first.dtype,
    )
    return double_quantize(fused) if first.double_quant else fused


# ------------------------------------------------------------------------------------------- dequantize

_PAIR_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _pair_table(quant_map: torch.Tensor) -> torch.Tensor:
    """fp32 [256, 2]: the two levels that each byte holds, (high nibble, low nibble)."""
    key = (hash(tuple(quant_map.tolist())), quant_map.device)
    if key not in _PAIR_TABLES:
        byte = torch.arange(256, device=quant_map.device)
        _PAIR_TABLES[key] = torch.stack([quant_map[byte >> 4], quant_map[byte & 15]], dim=1).float()
    return _PAIR_TABLES[key]


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode a QuantizedTensor to its original shape, in its original dtype or ``dtype``.

    Each value is the fp32 product level * absmax, rounded once to the output dtype.
    """
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise FormatError(f"cannot dequantize to {dtype}; expected float32, float16 or bfloat16")
    n, bs = q.numel(), q.blocksize
    absmax = q.absmax_fp32()
    if native.usable(q.data, dtype):
        return native.dequantize(q.data, absmax, q.quant_map, n, bs, dtype).view(q.shape)
    if cpu.usable(q.data) and n % bs == 0:
        try:
            return cpu.dequantize_blocks(q.data.view(-1, bs // 2), absmax, q.quant_map, dtype).view(q.shape)
        except Exception as err:  # a compiler problem: warn once, then the eager path gives the same values
            cpu.disable(err)
    table = _pair_table(q.quant_map)
    out = torch.empty(n, dtype=dtype, device=q.device)
    codes = q.data.view(-1)
    step = max(CHUNK_ELEMENTS // bs, 1) * bs
    for start in range(0, n, step):
        stop = min(start + step, n)
        b0, b1 = start // bs, -(-stop // bs)
        vals = table[codes[start // 2 : (stop + 1) // 2].int()].view(-1)
        vals = torch.nn.functional.pad(vals, (0, (b1 - b0) * bs - vals.numel())).view(-1, bs)
        torch.mul(vals, absmax[b0:b1, None], out=vals)
        vals.masked_fill_(vals.abs() < FLT_MIN, 0.0)
        out[start:stop] = vals.view(-1)[: stop - start]
    return out.view(q.shape)


# ------------------------------------------------------------------------------------------- state dicts


def _from_state_dict(state: dict[str, torch.Tensor], prefix: str) -> QuantizedTensor:
    meta_keys = [k for k in state if k.startswith(f"{prefix}.quant_state.")]
    if len(meta_keys) != 1:
        raise FormatError(f"expected one '{prefix}.quant_state.*' entry, found {len(meta_keys) or 'none'}")
    meta_key = meta_keys[0]
    owner_type = meta_key.rsplit(".", 1)[1]
    blob = state[meta_key]
    if blob.dtype != torch.uint8:
        raise FormatError(f"{meta_key}: expected a uint8 tensor of JSON, got {blob.dtype}")
    try:
        meta = json.loads(bytes(blob.cpu().numpy().tobytes()).decode("utf-8"))
        quant_type, blocksize = meta["quant_type"], int(meta["blocksize"])
        shape = torch.Size(int(d) for d in meta["shape"])
        dtype = {v: k for k, v in _DTYPE_NAMES.items()}[meta["dtype"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{meta_key}: invalid quant-state JSON ({type(e).__name__}: {e})") from e
    _check_options(quant_type, blocksize)
    if owner_type != f"{'bitsandbytes' if quant_type in codebook.BNB_QUANT_TYPES else 'nf4'}__{quant_type}":
        raise FormatError(f"{meta_key}: key does not match quant_type {quant_type!r} in its JSON")

    def get(name: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        key = f"{prefix}.{name}" if name else prefix
        if key not in state:
            raise FormatError(f"missing key {key!r} in the quantized state dict")
        t = state[key]
        if t.dtype != dtype:
            raise FormatError(f"{key}: expected dtype {dtype}, got {t.dtype}")
        if t.numel() != numel:
            raise FormatError(f"{key}: expected {numel} elements for shape {tuple(shape)}, got {t.numel()}")
        return t

    n = math.prod(shape)
    if n == 0:
        raise FormatError(f"{meta_key}: shape {tuple(shape)} has no elements")
    nblocks = -(-n // blocksize)
    nested = "nested_offset" in meta
    q = QuantizedTensor(
        data=get("", torch.uint8, (n + 1) // 2).reshape(-1, 1),
        absmax=get("absmax", torch.uint8 if nested else torch.float32, nblocks).reshape(-1),
        quant_map=get("quant_map", torch.float32, 16).reshape(-1),
        quant_type=quant_type,
        blocksize=blocksize,
        shape=shape,
        dtype=dtype,
    )
    if not nested:
        return q
    if int(meta.get("nested_blocksize", -1)) != NESTED_BLOCKSIZE:
        found = meta.get("nested_blocksize")
        raise FormatError(f"{meta_key}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {found}")
    offset = meta["nested_offset"]
    if not isinstance(offset, (int, float)) or not math.isfinite(offset):
        raise FormatError(f"{meta_key}: nested_offset must be a finite number, got {offset!r}")
    return replace(
        q,
        nested_absmax=get("nested_absmax", torch.float32, -(-nblocks // NESTED_BLOCKSIZE)).reshape(-1),
        nested_quant_map=get("nested_quant_map", torch.float32, 256).reshape(-1),
        nested_offset=float(torch.tensor(offset, dtype=torch.float32)),
    )
