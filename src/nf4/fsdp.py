"""4-bit weights for PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``): sharded by rows, all-gathered as bytes.

FSDP2 shards every parameter on dim 0 and all-gathers the shards before each forward and backward. A LinearNF4
keeps its weight in buffers, which FSDP2 would neither shard nor gather, and viewing the packed bytes as a bf16
parameter is not safe: bytes that spell a NaN may be canonicalized on the way (bitsandbytes issue #1945). So the
weight becomes one ``NF4Param``: a tensor subclass of the weight's shape ``[out, in]`` and dtype that owns the
quantized pieces, row by row, and tells FSDP2 (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``) to all-gather
those pieces as they are (uint8 codes, uint8 or fp32 scales)::

    data            uint8 [rows, in // 2]       the packed codes of each row (format.py's byte order)
    absmax          uint8 [rows, in // blocksize] with double quant, else fp32
    nested_absmax   fp32 [ceil(rows * in / blocksize / 256)]   double quant only
    quant_map, nested_quant_map, nested_offset  the same on every rank: kept, not gathered

A row holds whole blocks when ``in % blocksize == 0`` (required: every Llama-style layer satisfies it), so a shard
of rows is a valid NF4 tensor by itself. Double quant's nested blocks (256 absmax each) run across rows: with
``R = ceil(out / world)`` rows a shard, they stay whole if ``R * in / blocksize`` is a multiple of 256 (1.1B Llama
on 2 or 8 GPUs: 1024 x 32, 2816 x 32, 1024 x 88 ... all are). Otherwise a nested block would straddle two ranks,
and we store that layer's absmax decoded to fp32 instead (``absmax_fp32()``, the exact values the layer computes
with): +0.375 bits/param for that layer, no change in any output. The choice is made once, per layer, from the
shape and the world size (``keeps_double_quant``). A world size that does not divide ``out`` is padded by FSDP2
(zero rows on the last rank, never used).

``nf4 finetune --fsdp`` (nf4.fsdp_train) builds the model with these parameters on the meta device, shards it,
and has each rank read only its rows from the checkpoint (``load_model``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from nf4 import codebook
from nf4 import format as fmt
from nf4.format import NESTED_BLOCKSIZE, QuantizedTensor
from nf4.nn import LinearNF4

aten = torch.ops.aten


class ShardingError(ValueError):
    """A layer or a launch that cannot be sharded as asked: the message names the layer or setting."""


@dataclass
class _Meta:
    """What every shard of one weight shares. Mutable on purpose: ``copy_`` into a view updates its base too."""

    quant_type: str
    blocksize: int
    in_features: int
    out_features: int  # rows of the whole weight: post-all-gather drops FSDP's padding rows beyond it
    nested_offset: float | None


def keeps_double_quant(out_features: int, in_features: int, blocksize: int, world_size: int) -> bool:
    """Whether each rank's rows hold whole nested blocks (256 absmax), so that the 8-bit absmax can be sharded."""
    rows = -(-out_features // world_size)
    return rows * (in_features // blocksize) % NESTED_BLOCKSIZE == 0


def check_shardable(name: str, in_features: int, blocksize: int) -> None:
    if in_features % blocksize:
        raise ShardingError(
            f"{name}: in_features {in_features} is not a multiple of blocksize {blocksize}, so 4-bit blocks would "
            "straddle rows and the weight cannot be sharded by rows; quantize with a blocksize that divides it"
        )


class NF4Param(torch.Tensor):
    """A 2-D 4-bit weight as FSDP2 sees it: shape ``[out, in]`` and the weight's dtype, data held row by row.

    Only the ops FSDP2 and ``nn.Module`` use on parameters are defined (split, slice and copy along dim 0,
    ``new_zeros``, ``empty_like``, moves); compute goes through ``quantized()`` and ``nf4.ops``.
    """

    data_: torch.Tensor
    absmax: torch.Tensor
    quant_map: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_quant_map: torch.Tensor | None
    meta: _Meta

    @staticmethod
    def __new__(
        cls,
        data: torch.Tensor,
        absmax: torch.Tensor,
        quant_map: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_quant_map: torch.Tensor | None,
        meta: _Meta,
        dtype: torch.dtype,
        flat: bool = False,
    ) -> NF4Param:
        shape = (data.shape[0] * meta.in_features,) if flat else (data.shape[0], meta.in_features)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=data.device, requires_grad=False)

    def __init__(
        self,
        data: torch.Tensor,
        absmax: torch.Tensor,
        quant_map: torch.Tensor,
        nested_absmax: torch.Tensor | None,
        nested_quant_map: torch.Tensor | None,
        meta: _Meta,
        dtype: torch.dtype,
        flat: bool = False,
    ) -> None:
        self.data_, self.absmax, self.quant_map = data, absmax, quant_map
        self.nested_absmax, self.nested_quant_map, self.meta = nested_absmax, nested_quant_map, meta

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        dq = "+dq" if self.nested_absmax is not None else ""
        return f"NF4Param({self.meta.quant_type}{dq} b{self.meta.blocksize}, shape={tuple(self.shape)}, {self.dtype})"

    @property
    def rows(self) -> int:
        return self.data_.shape[0]

    def inner(self) -> list[torch.Tensor]:
        """The per-row pieces, in all-gather order."""
        return [t for t in (self.data_, self.absmax, self.nested_absmax) if t is not None]

    def _with(self, data: torch.Tensor, absmax: torch.Tensor, nested: torch.Tensor | None, **kw: Any) -> NF4Param:
        args = dict(quant_map=self.quant_map, nested_quant_map=self.nested_quant_map, meta=self.meta, dtype=self.dtype)
        return NF4Param(data, absmax, nested_absmax=nested, **(args | kw))

    def _nested(self, start: int, stop: int) -> slice:
        """The nested_absmax entries of rows [start, stop) of this tensor (start on a nested-block boundary)."""
        k = self.meta.in_features // self.meta.blocksize
        assert start * k % NESTED_BLOCKSIZE == 0, "a shard boundary inside a nested block"
        return slice(start * k // NESTED_BLOCKSIZE, -(-stop * k // NESTED_BLOCKSIZE))

    def _rows(self, start: int, stop: int) -> NF4Param:
        """A view of rows [start, stop): views of the pieces, the same shared state."""
        nested = None if self.nested_absmax is None else self.nested_absmax[self._nested(start, stop)]
        return self._with(self.data_[start:stop], self.absmax[start:stop], nested)

    def _map(self, fn: Any, **kw: Any) -> NF4Param:
        """fn applied to every tensor it owns, the state copied: a new, independent weight."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        meta = replace(self.meta)
        return NF4Param(
            fn(self.data_), fn(self.absmax), fn(self.quant_map), opt(self.nested_absmax), opt(self.nested_quant_map),
            meta, **({"dtype": self.dtype} | kw),
        )  # fmt: skip

    def quantized(self) -> QuantizedTensor:
        """The weight as a ``QuantizedTensor`` (views), for ``nf4.ops.matmul``; only for whole, gathered weights."""
        m = self.meta
        return QuantizedTensor(
            data=self.data_.reshape(-1, 1),
            absmax=self.absmax.reshape(-1),
            quant_map=self.quant_map,
            quant_type=m.quant_type,
            blocksize=m.blocksize,
            shape=torch.Size((self.rows, m.in_features)),
            dtype=self.dtype,
            nested_absmax=self.nested_absmax,
            nested_quant_map=self.nested_quant_map,
            nested_offset=m.nested_offset,
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"NF4Param does not implement {func}; compute with param.quantized() and nf4.ops, or dequantize it"
            )
        return handler(*args, **(kwargs or {}))

    # ------------------------------------------------------------------------------------------ FSDP2 hooks

    def fsdp_pre_all_gather(self, mesh: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
        """The pieces to all-gather, as stored (uint8 stays uint8: no float ever carries the codes).

        Every rank sends ``ceil(out / world)`` rows; the last rank's padding rows are zeros. (FSDP2's other hook
        signature requires inputs of the weight's padded shape, which packed pieces cannot have.)
        """
        padded = -(-self.meta.out_features // mesh.size())
        pieces = self.inner()
        if self.rows < padded:
            empty = self._with(*[t.new_zeros(0) for t in (self.data_, self.absmax)], None)
            full = _new_zeros(empty if self.nested_absmax is None else self, [padded, self.meta.in_features])
            _copy(full._rows(0, self.rows), self)
            pieces = full.inner()
        return tuple(pieces), (self.quant_map, self.nested_quant_map, replace(self.meta))

    def fsdp_post_all_gather(
        self,
        outputs: tuple[torch.Tensor, ...],
        metadata: Any,
        param_dtype: torch.dtype,
        *,
        out: torch.Tensor | None = None,
    ) -> tuple[NF4Param, tuple[torch.Tensor, ...]] | None:
        """The whole weight over the gathered pieces (views: FSDP2 frees and refills their storage in place)."""
        if out is not None:  # later all-gathers write into the same storage that out's pieces view
            return None
        quant_map, nested_quant_map, meta = metadata
        rows = meta.out_features
        nested = (
            outputs[2][: -(-rows * (meta.in_features // meta.blocksize) // NESTED_BLOCKSIZE)]
            if len(outputs) > 2
            else None
        )
        weight = NF4Param(outputs[0][:rows], outputs[1][:rows], quant_map, nested, nested_quant_map, meta, self.dtype)
        return weight, outputs


def _detach(t: NF4Param) -> NF4Param:
    return t._with(t.data_, t.absmax, t.nested_absmax)


def _split(t: NF4Param, size: int, dim: int = 0) -> list[NF4Param]:
    if dim != 0:
        raise NotImplementedError(f"NF4Param splits along rows (dim 0) only, not dim {dim}")
    return [t._rows(i, min(i + size, t.rows)) for i in range(0, t.rows, size)]


def _slice(t: NF4Param, dim: int = 0, start: int | None = None, end: int | None = None, step: int = 1) -> NF4Param:
    if dim != 0 or step != 1:
        raise NotImplementedError(f"NF4Param slices whole rows (dim 0, step 1), got dim {dim} step {step}")
    start, end, _ = slice(start, end).indices(t.rows)
    return t._rows(start, max(start, end))


def _new_zeros(t: NF4Param, size: list[int], **kwargs: Any) -> NF4Param:
    """Zero rows with t's layout (FSDP2 pads a shard with them); a 1-D ``[0]`` is an empty shard."""
    rows = size[0] if len(size) == 2 else 0
    m = t.meta
    k = m.in_features // m.blocksize
    device = kwargs.get("device") or t.device
    zeros = lambda n, like: torch.zeros(n, dtype=like.dtype, device=device)  # noqa: E731
    nested = None if t.nested_absmax is None else zeros(-(-rows * k // NESTED_BLOCKSIZE), t.nested_absmax)
    return t._with(
        zeros((rows, m.in_features // 2), t.data_), zeros((rows, k), t.absmax), nested,
        meta=replace(m), dtype=kwargs.get("dtype") or t.dtype,
    )  # fmt: skip


def _copy(dst: NF4Param, src: NF4Param, non_blocking: bool = False) -> NF4Param:
    if (
        not isinstance(src, NF4Param)
        or src.rows != dst.rows
        or (src.nested_absmax is None) != (dst.nested_absmax is None)
    ):
        raise NotImplementedError("NF4Param copies from an NF4Param of the same rows and layout only")
    for d, s in zip(dst.inner() + [dst.quant_map], src.inner() + [src.quant_map], strict=True):
        d.copy_(s, non_blocking=non_blocking)
    if dst.nested_quant_map is not None:
        dst.nested_quant_map.copy_(src.nested_quant_map)
    dst.meta.nested_offset = src.meta.nested_offset
    return dst


def _view(t: NF4Param, size: list[int]) -> NF4Param:
    """view(-1) (FSDP2 keeps one of the padded shard) or a view as itself."""
    if list(size) in ([-1], [t.numel()]):
        return t._with(t.data_, t.absmax, t.nested_absmax, flat=True)
    if tuple(size) == tuple(t.shape):
        return _detach(t)
    raise NotImplementedError(f"NF4Param views as itself or flat only, not {list(size)}")


def _as_strided(t: NF4Param, size: list[int], stride: list[int], storage_offset: int = 0) -> NF4Param:
    if tuple(size) != tuple(t.shape) or tuple(stride) != tuple(t.stride()) or storage_offset:
        raise NotImplementedError(f"NF4Param as_strided to itself only, not {list(size)}/{list(stride)}")
    return _detach(t)


def _empty_like(t: NF4Param, dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> NF4Param:
    return t._map(lambda x: torch.empty_like(x, device=device or x.device), dtype=dtype or t.dtype)


def _to_copy(t: NF4Param, dtype: torch.dtype | None = None, device: Any = None, **kwargs: Any) -> NF4Param:
    """A move keeps the bytes; a new dtype is the weight's new compute dtype (the 4-bit data is unchanged)."""
    non_blocking = kwargs.get("non_blocking", False)
    return t._map(lambda x: x.to(device or x.device, non_blocking=non_blocking), dtype=dtype or t.dtype)


_OPS = {
    aten.detach.default: _detach,
    aten.alias.default: _detach,
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.copy_.default: _copy,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.empty_like.default: _empty_like,
    aten._to_copy.default: _to_copy,
    aten.clone.default: lambda t, **_: t._map(torch.clone),
    aten.is_pinned.default: lambda t, device=None: t.data_.is_pinned(),
}


def to_param(q: QuantizedTensor, world_size: int, name: str = "weight") -> NF4Param:
    """A 2-D QuantizedTensor as an NF4Param to be sharded over ``world_size`` ranks (same values, bit for bit).

    Raises:
        ShardingError: not 2-D, or ``in_features`` not a multiple of the blocksize.
    """
    if len(q.shape) != 2:
        raise ShardingError(f"{name}: only 2-D weights are sharded by rows, got shape {tuple(q.shape)}")
    out_f, in_f = q.shape
    check_shardable(name, in_f, q.blocksize)
    dq = q.double_quant and keeps_double_quant(out_f, in_f, q.blocksize, world_size)
    k = in_f // q.blocksize
    meta = _Meta(q.quant_type, q.blocksize, in_f, out_f, q.nested_offset if dq else None)
    return NF4Param(
        q.data.view(out_f, in_f // 2),
        (q.absmax if dq else q.absmax_fp32()).view(out_f, k),
        q.quant_map,
        q.nested_absmax if dq else None,
        q.nested_quant_map if dq else None,
        meta,
        q.dtype,
    )


def placeholder(
    out_features: int,
    in_features: int,
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    dtype: torch.dtype,
    world_size: int,
    name: str = "weight",
) -> NF4Param:
    """An NF4Param on the meta device with the layout ``to_param`` would give: built before the data is read."""
    check_shardable(name, in_features, blocksize)
    dq = double_quant and keeps_double_quant(out_features, in_features, blocksize, world_size)
    k = in_features // blocksize
    empty = lambda *size, dt: torch.empty(size, dtype=dt, device="meta")  # noqa: E731
    meta = _Meta(quant_type, blocksize, in_features, out_features, 0.0 if dq else None)
    return NF4Param(
        empty(out_features, in_features // 2, dt=torch.uint8),
        empty(out_features, k, dt=torch.uint8 if dq else torch.float32),
        empty(16, dt=torch.float32),
        empty(-(-out_features * k // NESTED_BLOCKSIZE), dt=torch.float32) if dq else None,
        empty(256, dt=torch.float32) if dq else None,
        meta,
        dtype,
    )


class ShardableLinearNF4(LinearNF4):
    """A LinearNF4 whose weight is one ``NF4Param`` parameter (frozen), so that FSDP2 shards and gathers it.

    Inside FSDP2's forward and backward the parameter is the whole weight; between them it is this rank's rows
    (a DTensor). Its state dict holds that parameter as FSDP2 does, not bitsandbytes' keys: the base of a QLoRA
    run is never saved, only the adapters.
    """

    def __init__(self, weight: NF4Param, bias: nn.Parameter | None, compute_dtype: torch.dtype | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = weight.meta.in_features, weight.meta.out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear_nf4(cls, layer: LinearNF4, world_size: int, name: str = "weight") -> ShardableLinearNF4:
        return cls(to_param(layer.qweight, world_size, name), layer.bias, layer.compute_dtype)

    @property
    def qweight(self) -> QuantizedTensor:
        """The gathered weight (valid inside FSDP2's forward/backward, or before sharding)."""
        return self.weight.quantized()

    @property
    def quant_type(self) -> str:
        return self._meta().quant_type

    @property
    def blocksize(self) -> int:
        return self._meta().blocksize

    @property
    def nested_offset(self) -> float | None:
        return self._meta().nested_offset

    @property
    def weight_nested_offset(self) -> None:
        """No device copy of the offset: the meta's float changes on load and copy_, so the ops copy it per call."""
        return None

    def _meta(self) -> _Meta:
        w = self.weight
        return (w._local_tensor if hasattr(w, "_local_tensor") else w).meta

    _save_to_state_dict = nn.Module._save_to_state_dict
    _load_from_state_dict = nn.Module._load_from_state_dict


def shard_linears(model: nn.Module, world_size: int) -> nn.Module:
    """Replace every LinearNF4 of a model by a ShardableLinearNF4 (same bytes), in place, before ``fully_shard``."""
    for name, m in list(model.named_modules()):
        if type(m) is LinearNF4:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, ShardableLinearNF4.from_linear_nf4(m, world_size, name))
    return model


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (the tensor itself when it is not sharded)."""
    return p._local_tensor if hasattr(p, "_local_tensor") else p


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of this rank's shards of the 4-bit weights, bytes of the whole 4-bit weights), codes and scales."""
    local = whole = 0
    for m in model.modules():
        if isinstance(m, ShardableLinearNF4):
            w = local_tensor(m.weight)
            local += sum(t.nbytes for t in w.inner())
            per_row = sum(t.nbytes for t in w.inner()[:2]) / max(w.rows, 1)
            nested = 0 if w.nested_absmax is None else 4 * -(-m.out_features * m.in_features // m.blocksize // 256)
            whole += round(per_row * m.out_features) + nested
    return local, whole


# ------------------------------------------------------------------------------------------- process group


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the torchrun job (NCCL on GPU, gloo on CPU): (rank, world size, this rank's device).

    A collective that waits longer than ``timeout_s`` (a rank died or hangs) raises instead of blocking forever;
    torchrun then stops the other ranks.

    Raises:
        ShardingError: not launched by torchrun (no RANK/WORLD_SIZE in the environment).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ShardingError(
            "--fsdp needs torchrun: torchrun --nproc-per-node N -m nf4.cli finetune ... --fsdp "
            "(RANK and WORLD_SIZE are not set)"
        )
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def exit_worker(code: int = 0) -> NoReturn:
    """End a torchrun worker: destroy the process group, flush stdout and stderr, and exit without the
    interpreter's shutdown.

    Why: gloo's worker threads outlive ``destroy_process_group`` while FSDP2's state still holds the group, and a
    finished all-gather's work object is destroyed on its worker thread after the caller's ``wait`` returned. If
    it holds the last reference to a view whose Python object must be freed while the interpreter shuts down, the
    thread cannot take the GIL, Python ends it with ``pthread_exit``, its unwinding meets a noexcept destructor and
    the process aborts ("terminate called without an active exception"): a finished job then fails. A core dump's
    backtrace showed exactly that (~AsyncAllgatherWork, ~TensorImpl, decref_pyobject, take_gil, pthread_exit,
    std::terminate; the main thread in Py_FinalizeEx), in 2 of ~540 2-rank CPU runs here and in two CI runs.
    Every output must be written (files closed) before the call.
    """
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:  # a closed pipe's flush error must not send the worker back to the interpreter's shutdown
        os._exit(code)


def row_range(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [start, stop) of rank's shard, as FSDP2 chunks dim 0 (``torch.chunk``: ceil(rows / world) each)."""
    per = -(-rows // world_size)
    start = min(rank * per, rows)
    return start, min(start + per, rows)


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class _Layout:
    """How one 4-bit layer comes: stored in the checkpoint, or quantized here from a float tensor."""

    quant_type: str
    blocksize: int
    double_quant: bool
    dtype: torch.dtype
    stored: bool
    nested_offset: float | None = None


class _Reader:
    """This rank's rows of each tensor: only those bytes are read from safetensors files; a GGUF tensor is decoded
    whole (one at a time, as nf4.checkpoint does) and then cut."""

    def __init__(self, source: Any, label: str) -> None:
        self.source, self.label = source, label
        self.layouts: dict[str, _Layout] = {}
        self._files: dict[Path, Any] = {}

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) along dim 0 of a tensor."""
        where = self.source.where[key]
        if not isinstance(where, Path):
            return self.source.get(key)[start:stop]
        if where not in self._files:
            from safetensors import safe_open

            self._files[where] = safe_open(str(where), "pt")
        return self._files[where].get_slice(key)[start:stop]

    def has(self, key: str) -> bool:
        return key in self.source.where

    def stored_layout(self, name: str, shape: tuple[int, int]) -> _Layout:
        """A 4-bit weight's layout from its quant-state JSON (the tensors themselves are read by rows later)."""
        import json

        from nf4.checkpoint import CheckpointError

        key = next(k for k in self.source.keys() if k.startswith(f"{name}.weight.quant_state."))
        try:
            meta = json.loads(bytes(self.source.get(key).numpy().tobytes()).decode("utf-8"))
            offset = meta.get("nested_offset")
            layout = _Layout(
                meta["quant_type"],
                int(meta["blocksize"]),
                offset is not None,
                getattr(torch, meta["dtype"]),
                True,
                None if offset is None else float(torch.tensor(offset, dtype=torch.float32)),
            )
            fmt._check_options(layout.quant_type, layout.blocksize)
            found = tuple(int(d) for d in meta["shape"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{self.label}: {key}: invalid quant state ({type(e).__name__}: {e})") from e
        if found != shape:
            raise CheckpointError(f"{self.label}: {name}.weight has shape {found}, the model expects {shape}")
        return layout

    def quantized_rows(
        self, name: str, shape: tuple[int, int], start: int, stop: int, device: torch.device
    ) -> NF4Param:
        """Rows [start, stop) of a 4-bit weight, bit-identical to those rows of ``nf4.from_pretrained``'s weight.

        A float source is quantized here, these rows only: blocks never cross rows, so the codes and fp32 absmax
        are the whole tensor's. Double quant's offset is the mean of the whole tensor's absmax, so the ranks
        all-gather their fp32 absmax (1/16 of the 4-bit bytes) and each double-quantizes it whole with
        ``nf4.format``. Every rank must call this for every layer, in the same order.
        """
        lay, key = self.layouts[name], f"{name}.weight"
        out_f, in_f = shape
        k = in_f // lay.blocksize
        world = dist.get_world_size()
        full_shape = torch.Size(shape)
        if lay.stored:
            data = self.rows(key, start * in_f // 2, stop * in_f // 2).view(-1, in_f // 2)
            quant_map = self.source.get(f"{key}.quant_map")
            # absmax from the start of the nested block holding this shard's first one, so nested_absmax lines up
            first = start * k // NESTED_BLOCKSIZE * NESTED_BLOCKSIZE if lay.double_quant else start * k
            absmax = self.rows(f"{key}.absmax", first, stop * k)
            q = QuantizedTensor(data, absmax, quant_map, lay.quant_type, lay.blocksize, full_shape, lay.dtype)
            if lay.double_quant:
                q = replace(
                    q,
                    nested_absmax=self.rows(f"{key}.nested_absmax", first // NESTED_BLOCKSIZE, -(-stop * k // 256)),
                    nested_quant_map=self.source.get(f"{key}.nested_quant_map"),
                    nested_offset=lay.nested_offset,
                )
        else:
            rows = self.rows(key, start, stop).to(lay.dtype)
            if stop > start:
                q = fmt.quantize(rows, lay.quant_type, lay.blocksize, double_quant=False)
            else:
                empty = torch.zeros(0, dtype=torch.uint8)
                q = QuantizedTensor(
                    empty, torch.zeros(0), codebook.levels(lay.quant_type), lay.quant_type, 0, full_shape, lay.dtype
                )
            q = replace(q, data=q.data.view(-1, in_f // 2), blocksize=lay.blocksize, shape=full_shape)
            first = start * k
            if lay.double_quant:
                per = -(-out_f // world) * k
                sent = torch.nn.functional.pad(q.absmax, (0, per - q.absmax.numel())).to(device)
                parts = [torch.empty_like(sent) for _ in range(world)]
                dist.all_gather(parts, sent)
                q = fmt.double_quantize(replace(q, absmax=torch.cat(parts).cpu()[: out_f * k]))  # reads absmax only
                first = 0
        return _cut(q, start * k - first, stop * k - first, keeps_double_quant(out_f, in_f, lay.blocksize, world))


def _cut(q: QuantizedTensor, a0: int, a1: int, keep_dq: bool) -> NF4Param:
    """An NF4Param of q's rows (q.data) whose absmax are q.absmax[a0:a1]; q's nested blocks start with its absmax."""
    out_f, in_f = q.shape
    k = in_f // q.blocksize
    meta = _Meta(q.quant_type, q.blocksize, in_f, out_f, None)
    if q.double_quant and keep_dq:
        meta.nested_offset = q.nested_offset
        nested = q.nested_absmax[a0 // NESTED_BLOCKSIZE : -(-a1 // NESTED_BLOCKSIZE)]
        absmax = q.absmax[a0:a1].reshape(-1, k)
        return NF4Param(q.data, absmax, q.quant_map, nested, q.nested_quant_map, meta, q.dtype)
    absmax = (q.absmax_fp32() if q.double_quant else q.absmax)[a0:a1].reshape(-1, k)
    return NF4Param(q.data, absmax, q.quant_map, None, None, meta, q.dtype)


def load_model(
    src: str | os.PathLike | None,
    world_size: int,
    dtype: torch.dtype,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
) -> tuple[nn.Module, _Reader]:
    """(model, reader): the model with every parameter on the meta device, 4-bit layers as ShardableLinearNF4;
    buffers (rotary tables) real. Nothing is read yet: ``fully_shard`` it, then ``materialize`` this rank's rows.

    Args:
        src: an HF folder (float or 4-bit safetensors) or a GGUF file; None is the embedded SmolLM2.
        dtype: of the float tensors (and the float weights before quantizing), as ``nf4.from_pretrained``'s.
        quant_type, blocksize, double_quant: for float sources; a 4-bit folder keeps its own.
    """
    from nf4 import checkpoint

    path = checkpoint._resolve(src)
    from transformers import AutoConfig

    if path.is_dir():
        checkpoint.verify_manifest(path)
        source: Any = checkpoint._SafetensorsSource(checkpoint._safetensors_files(path))
        # The skeleton's float tensors are uninitialized CPU memory, never touched: they cost no pages.
        model = checkpoint._skeleton(AutoConfig.from_pretrained(path), causal_lm=True)
    else:
        from gguf import GGUFReader

        config = checkpoint.gguf_config(path)
        gguf = GGUFReader(path)
        checkpoint._gguf_arch(gguf, path)
        gguf.fields.clear()
        model = checkpoint._skeleton(config, causal_lm=True)
        source = checkpoint._GGUFSource(path, model, gguf)
    reader = _Reader(source, str(path))
    stored = sorted({k.split(".weight.quant_state.")[0] for k in source.keys() if ".weight.quant_state." in k})
    for name in stored or checkpoint._linear_names(model, ("lm_head",)):
        linear = model.get_submodule(name)
        shape = (linear.out_features, linear.in_features)
        if stored:
            layout = reader.stored_layout(name, shape)
        else:
            layout = _Layout(quant_type, blocksize, double_quant, dtype, False)
        reader.layouts[name] = layout
        weight = placeholder(*shape, layout.quant_type, layout.blocksize, layout.double_quant, dtype, world_size, name)
        bias = None if linear.bias is None else nn.Parameter(torch.empty_like(linear.bias, device="meta", dtype=dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ShardableLinearNF4(weight, bias, dtype))
    memo: dict[int, nn.Parameter] = {}  # one meta Parameter per tied group
    for m in model.modules():
        for attr, p in list(m._parameters.items()):
            if p is not None and not p.is_meta:
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta", dtype=dtype))
                m._parameters[attr] = memo[id(p)]
    return model, reader


def materialize(model: nn.Module, reader: _Reader, device: torch.device, dtype: torch.dtype) -> None:
    """Allocate this rank's shards of a ``fully_shard``-ed meta model on ``device`` and read them from the checkpoint.

    LoRA adapters are left uninitialized (their values come from a seed, not the checkpoint). Float tensors are
    cast to ``dtype`` and then to the parameter's own dtype (fp32 norms), as a one-process load does.

    Raises:
        CheckpointError: a tensor the model needs is not in the checkpoint.
    """
    from nf4.checkpoint import CheckpointError

    rank, world = dist.get_rank(), dist.get_world_size()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
        for name, m in model.named_modules():
            if isinstance(m, ShardableLinearNF4):
                start, stop = row_range(m.out_features, rank, world)
                key = name.replace(".base_layer", "")  # LoRA wraps the layer; the checkpoint knows it unwrapped
                rows = reader.quantized_rows(key, (m.out_features, m.in_features), start, stop, device)
                _copy(local_tensor(m.weight), rows.to(device))
        for names in aliases.values():
            p = model.get_parameter(names[0])
            owner = model.get_submodule(names[0].rpartition(".")[0])
            if ".lora_" in names[0] or (isinstance(owner, ShardableLinearNF4) and names[0].endswith(".weight")):
                continue
            key = next((k for k in (n.replace(".base_layer", "") for n in names) if reader.has(k)), None)
            if key is None:
                raise CheckpointError(f"{reader.label}: missing tensor {names[0]!r}")
            start, stop = row_range(p.shape[0], rank, world)
            local_tensor(p).copy_(reader.rows(key, start, stop).to(dtype).to(p.dtype))
