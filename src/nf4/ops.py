"""torch.library ops ``nf4::quantize``, ``nf4::dequantize``, ``nf4::matmul`` and their public wrappers.

Each op has one implementation function: Triton kernels on CUDA tensors, the vectorized PyTorch path of
``nf4.format`` otherwise (CPU, or no Triton). The function is traceable, so it also serves as the fake
implementation and ``torch.compile(fullgraph=True)`` sees through it (on CPU, into plain torch ops), except
where ``nf4::matmul`` takes a table kernel: that goes through ``nf4::matmul_table``, which compiled code calls as
it is (the kernels' register cap is a launch option Inductor would drop). ``nf4::matmul`` is differentiable in
its input: grad_x = grad_out @ W, W dequantized in grad_out's dtype.

The double-quant offset enters the ops as a 0-d fp32 tensor on the weight's device, not as the Python float of
``QuantizedTensor.nested_offset``: torch.compile specializes a graph on each float argument, so a float would
compile every layer of a model anew; as a tensor, one graph serves them all. ``LinearNF4`` holds it as a buffer
(``weight_nested_offset``) and passes it in; for a bare QuantizedTensor it is copied to the device per call.

Example:
    >>> q = nf4.ops.quantize(torch.randn(256, 128, device="cuda"))
    >>> y = nf4.ops.matmul(torch.randn(4, 128, device="cuda"), q)   # [4, 256]
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch._library.triton import set_wrap_triton_enabled

from nf4 import format, native
from nf4.format import NESTED_BLOCKSIZE, FormatError, QuantizedTensor

HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON:
    from nf4.kernels import common as _kcommon
    from nf4.kernels import dequantize as _kdequantize
    from nf4.kernels import gemm as _kgemm
    from nf4.kernels import gemv as _kgemv
    from nf4.kernels import gemv_tc as _kgemv_tc
    from nf4.kernels import gemv_tcm as _kgemv_tcm
    from nf4.kernels import mma as _kmma
    from nf4.kernels import quantize as _kquantize


_op = torch.library.triton_op if HAS_TRITON else torch.library.custom_op


def _on_gpu(t: torch.Tensor) -> bool:
    return HAS_TRITON and t.device.type == "cuda"


def _dequantize_torch(
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """format.dequantize in one traceable pass: no chunk loop, no host reads. Flat ``[numel]``."""
    if nested_absmax is not None:
        scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
        absmax = format._flush(nested_quant_map[absmax.long()] * scale) + nested_offset
    codes = data.reshape(-1).long()
    levels = torch.stack([quant_map[codes >> 4], quant_map[codes & 15]], dim=1).reshape(-1)
    nblocks = absmax.numel()
    levels = F.pad(levels, (0, nblocks * blocksize - levels.numel())).view(nblocks, blocksize)
    return format._flush(levels * absmax[:, None]).reshape(-1)[:numel].to(dtype)


# ------------------------------------------------------------------------------------------- the ops


@_op("nf4::dequantize", mutates_args=())
def _dequantize_op(
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    numel = math.prod(shape)
    args = (data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, numel, dtype)
    flat = _kdequantize.dequantize(*args) if _on_gpu(data) else _dequantize_torch(*args)
    return flat.view(shape)


@_op("nf4::quantize", mutates_args=())
def _quantize_op(
    tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, absmax or its 8-bit codes, nested_absmax, offset); the last two are empty without double quant.

    The CPU path is ``nf4.format.quantize`` itself (eager only: it checks values on the host).
    """
    if _on_gpu(tensor):
        return _kquantize.quantize(tensor.contiguous(), quant_type, blocksize, double_quant)
    q = format.quantize(tensor, quant_type, blocksize, double_quant)
    if not double_quant:
        return q.data, q.absmax, q.absmax.new_empty(0), q.absmax.new_empty(0)
    return q.data, q.absmax, q.nested_absmax, torch.tensor(q.nested_offset, dtype=torch.float32)


def _matmul_impl(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_quant_map: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    blocksize: int,
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    qargs = (data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, out_features, bias)
    if _on_gpu(x):
        out = _matmul_cuda(x2 if x2.stride(1) == 1 else x2.contiguous(), qargs)
    else:
        w = _dequantize_torch(*qargs[:-2], out_features * k, x.dtype).view(out_features, k)
        out = F.linear(x2, w, bias)
    return out.view(*x.shape[:-1], out_features)


def _matmul_cuda(x: torch.Tensor, qargs: tuple) -> torch.Tensor:
    """The fastest kernel for x's rows (H200 sweeps, docs/BENCHMARKS.md): for one row the tensor-core decode kernel
    on weights of at least gemv_tc.MIN_PARAMS, the FMA kernel otherwise (fp32 x: up to 4 rows); for 2-16 rows
    (bf16/fp16) the table-lookup tensor-core kernels (gemv_tc for 2-4, gemv_tcm beyond), for up to 64 the
    byte-permute one; dequantize + cuBLAS beyond, for no rows and partial-block rows."""
    m, k = x.shape
    blocksize = qargs[6]
    if m == 0 or not _kgemv.supported(k, blocksize):
        return _kgemm.gemm(x, *qargs)
    table = _table_kernel(x, blocksize, qargs[7])
    if table is not None:
        return torch.ops.nf4.matmul_table(x, *qargs) if _kcommon.tracing() else table(x, *qargs)
    if _kmma.MIN_M <= m <= _kmma.MAX_M and _kmma.supported(x, k, blocksize):
        return _kmma.mma(x, *qargs)
    if m <= _kgemv.MAX_M:
        return _kgemv.gemv(x, *qargs)
    return _kgemm.gemm(x, *qargs)


def _table_kernel(x: torch.Tensor, blocksize: int, out_features: int) -> Callable[..., torch.Tensor] | None:
    """The table kernel that takes x, if one does: gemv_tc for one row of a large weight and for 2-4 rows of any
    (H200, twentieth session: 4-25% faster than gemv_tcm at M = 2-4 on 10 Llama shapes), gemv_tcm for 5-16. None
    before Ampere (their PTX needs compute capability 8.0)."""
    k = x.shape[1]
    if _kgemv_tc.supported(x, k, blocksize) and (x.shape[0] > 1 or out_features * k >= _kgemv_tc.MIN_PARAMS):
        return _kgemv_tc.gemv_tc
    if _kgemv_tcm.supported(x, k, blocksize):
        return _kgemv_tcm.gemv_tcm
    return None


_matmul_op = _op("nf4::matmul", mutates_args=())(_matmul_impl)

if HAS_TRITON:
    # The table kernels behind an op that torch.compile does not trace into: each needs a register cap at launch
    # (64 or 80, so that 3-4 programs share an SM), a launch option Inductor drops from the kernels it launches
    # itself (``config_to_dict`` keeps num_warps and num_stages only). Inductor calls this op as it is, so compiled
    # code, CUDA-graphed or not, runs the same kernels as eager mode. Its arguments are nf4::matmul's.
    torch.library.define("nf4::matmul_table", str(torch.ops.nf4.matmul.default._schema).removeprefix("nf4::matmul"))

    @torch.library.impl("nf4::matmul_table", ("cpu", "cuda"))
    def _matmul_table(x: torch.Tensor, *state: object) -> torch.Tensor:
        table = _table_kernel(x, state[6], state[7])  # blocksize, out_features (after the weight's six tensors)
        assert table is not None, (x.shape, x.dtype, state[6], state[7])
        with set_wrap_triton_enabled(False):  # launched at run time, never traced
            return table(x, *state)

    @torch.library.register_fake("nf4::matmul_table")
    def _(x: torch.Tensor, *state: object) -> torch.Tensor:
        return x.new_empty((x.shape[0], state[7]))


if not HAS_TRITON:  # custom_op needs its fake implementation named; the torch path is traceable
    _dequantize_op.register_fake(_dequantize_op._init_fn)
    _matmul_op.register_fake(_matmul_op._init_fn)


def _matmul_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: torch.Tensor) -> None:
    x, data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset, blocksize, out_features, _ = inputs
    ctx.save_for_backward(data, absmax, quant_map, nested_absmax, nested_quant_map, nested_offset)
    ctx.qmeta = (blocksize, [out_features, x.shape[-1]])


def _matmul_backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
    # grad_x = grad_out @ W: W dequantized at copy speed into grad's dtype, then cuBLAS (the training shapes)
    blocksize, shape = ctx.qmeta
    w = torch.ops.nf4.dequantize(*ctx.saved_tensors, blocksize, shape, grad.dtype)
    return (grad @ w,) + (None,) * 9


_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


# ------------------------------------------------------------------------------------ public wrappers


def _eager() -> bool:
    """Not under torch.compile: call the kernels (or format.py on CPU) without the op dispatch.

    Dispatch through a custom op costs more than the work at these sizes: on an H200 host, 130-190 us of Python
    per nf4::dequantize / nf4::matmul call against a 7 us dequantize kernel, which left a QLoRA step waiting on
    the CPU; on CPU, format.py's chunked path also beats the op's single traceable pass.
    """
    return not torch.compiler.is_compiling()


def _dequantize_eager(q: QuantizedTensor, dtype: torch.dtype, offset: torch.Tensor | None) -> torch.Tensor:
    if _on_gpu(q.data):
        with set_wrap_triton_enabled(False):  # plain tensors: launch the kernel, not the tracing wrapper
            return _kdequantize.dequantize(*_qargs(q, offset), q.numel(), dtype).view(q.shape)
    return format.dequantize(q, dtype)


def _offset(q: QuantizedTensor, offset: torch.Tensor | None) -> torch.Tensor | None:
    """q's double-quant offset as the ops take it: ``offset`` when the caller holds it as a tensor, else made from
    q.nested_offset by a fill on q's device (no host->device copy, so a CUDA graph can capture it; under
    torch.compile, a graph specialized on its value)."""
    if q.nested_absmax is None:
        return None
    return offset if offset is not None else torch.full((), q.nested_offset, dtype=torch.float32, device=q.device)


def _qargs(q: QuantizedTensor, offset: torch.Tensor | None) -> tuple:
    return (q.data, q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, _offset(q, offset), q.blocksize)


def dequantize(
    q: QuantizedTensor, dtype: torch.dtype | None = None, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode ``q`` to its shape in ``dtype`` (default: its original dtype); equal to ``nf4.dequantize``.

    Args:
        offset: ``q.nested_offset`` as a 0-d fp32 tensor on q's device, if the caller keeps one
            (``LinearNF4.weight_nested_offset``): no copy per call, one compiled graph for every weight.

    Example:
        >>> w = nf4.ops.dequantize(q, torch.bfloat16)
    """
    dtype = q.dtype if dtype is None else dtype
    if dtype not in format.FLOAT_DTYPES:
        raise FormatError(f"cannot dequantize to {dtype}; expected float32, float16 or bfloat16")
    if _eager():
        return _dequantize_eager(q, dtype, offset)
    return torch.ops.nf4.dequantize(*_qargs(q, offset), list(q.shape), dtype)


def quantize(
    tensor: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantizedTensor:
    """``nf4.quantize`` through the op: Triton on CUDA, the reference elsewhere; the bytes are equal.

    Raises:
        FormatError: bad dtype, empty tensor, unknown quant_type or blocksize, NaN or Inf values.
    """
    format._check_tensor(tensor)
    format._check_options(quant_type, blocksize)
    data, absmax, nested_absmax, offset = torch.ops.nf4.quantize(tensor.detach(), quant_type, blocksize, double_quant)
    # NaN/Inf anywhere makes its block's absmax, and so the mean of absmax, non-finite: one host read checks both.
    nested_offset = offset.item() if double_quant else None
    finite = math.isfinite(nested_offset) if double_quant else bool(torch.isfinite(absmax).all())
    if not finite:
        raise FormatError("cannot quantize NaN or Inf values")
    return QuantizedTensor(
        data=data,
        absmax=absmax,
        quant_map=format._levels(quant_type, tensor.device),
        quant_type=quant_type,
        blocksize=blocksize,
        shape=tensor.shape,
        dtype=tensor.dtype,
        nested_absmax=nested_absmax if double_quant else None,
        nested_quant_map=format._dynamic_map(tensor.device) if double_quant else None,
        nested_offset=nested_offset,
    )


def matmul(
    x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None = None, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequantize(q).T + bias`` in x's dtype, without materializing W at small batch.

    Args:
        x: ``[..., K]`` float tensor on q's device.
        q: a 2-D quantized weight ``[N, K]``.
        bias: optional ``[N]``.
        offset: as in ``dequantize``.

    Returns:
        ``[..., N]`` in x's dtype. Differentiable in x.
    """
    if len(q.shape) != 2:
        raise ValueError(f"matmul needs a 2-D quantized weight [out_features, in_features], got shape {tuple(q.shape)}")
    n, k = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim; the weight {tuple(q.shape)} expects {k}")
    if x.dtype not in format.FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if not _eager():
        return torch.ops.nf4.matmul(x, *_qargs(q, offset), n, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _EagerMatmul.apply(x, q, bias, offset)
    return _matmul_eager(x, q, bias, offset)  # nothing to record: skip the Function's ~15 us of bookkeeping a call


def _matmul_eager(
    x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None, offset: torch.Tensor | None
) -> torch.Tensor:
    """The op's own kernels (or the CPU paths), no dispatch; on the GPU ``offset`` as ``_offset`` makes it."""
    if _on_gpu(x):
        with set_wrap_triton_enabled(False):
            return _matmul_impl(x, *_qargs(q, offset), q.shape[0], bias)
    if native.matmul_usable(x, q):  # a few rows (generation): W read once as 4-bit, no float copy
        return native.matmul(x, q, bias)
    return F.linear(x, format.dequantize(q, x.dtype), bias)


class _EagerMatmul(torch.autograd.Function):
    """``x @ dequantize(W).T`` outside torch.compile when a gradient is wanted. Backward dequantizes again rather
    than saving W, so no float copy of the base outlives a call (QLoRA keeps only the 4-bit weight)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        q: QuantizedTensor,
        bias: torch.Tensor | None,
        offset: torch.Tensor | None,
    ) -> torch.Tensor:
        if _on_gpu(x):
            offset = _offset(q, offset)  # made once, for backward too
        ctx.q, ctx.offset = q, offset
        return _matmul_eager(x, q, bias, offset)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        grad_x = grad @ _dequantize_eager(ctx.q, grad.dtype, ctx.offset) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, None
