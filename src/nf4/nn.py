"""``LinearNF4``, a drop-in for ``nn.Linear`` with a 4-bit weight, and ``quantize_model`` that swaps them in.

The weight lives in one place: plain buffers holding a ``QuantizedTensor``'s tensors, so ``.to()``, ``state_dict()``
and ``load_state_dict()`` work as for any module. On disk the keys are transformers + bitsandbytes' own::

    weight                                   uint8 [(out*in + 1) // 2, 1]   packed codes
    weight.absmax                            fp32 [nblocks] (uint8 with double quant)
    weight.quant_map                         fp32 [16]
    weight.nested_absmax, .nested_quant_map  fp32 (double quant only)
    weight.quant_state.bitsandbytes__nf4     uint8 JSON: quant_type, blocksize, dtype, shape, nested_offset
    bias                                     as in nn.Linear

The double-quant offset is also kept as a 0-d fp32 buffer, ``weight_nested_offset`` (non-persistent: the JSON holds
it on disk), which the ops read on the device: no copy per call, and torch.compile makes one graph for all layers
instead of one per offset value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from nf4 import codebook, ops
from nf4 import format as fmt
from nf4.format import QuantizedTensor

# Buffer names in memory (attribute names cannot hold dots); on disk each is "weight.<field>".
_FIELDS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _placeholder(
    shape: tuple[int, int],
    quant_type: str,
    blocksize: int,
    double_quant: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> QuantizedTensor:
    """A QuantizedTensor of the right shapes with no values, for modules built on the meta device."""
    n = math.prod(shape)
    nblocks = -(-n // blocksize)
    empty = lambda size, dt: torch.empty(size, dtype=dt, device=device)  # noqa: E731
    return QuantizedTensor(
        data=empty(((n + 1) // 2, 1), torch.uint8),
        absmax=empty(nblocks, torch.uint8 if double_quant else torch.float32),
        quant_map=empty(16, torch.float32),
        quant_type=quant_type,
        blocksize=blocksize,
        shape=torch.Size(shape),
        dtype=dtype,
        nested_absmax=empty(-(-nblocks // fmt.NESTED_BLOCKSIZE), torch.float32) if double_quant else None,
        nested_quant_map=empty(256, torch.float32) if double_quant else None,
        nested_offset=0.0 if double_quant else None,
    )


class LinearNF4(nn.Module):
    """``nn.Linear`` whose weight is stored blockwise in 4 bits (NF4 + double quant by default).

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``; ``dtype`` is the weight's original
            dtype (what ``dequantize`` returns) and the bias's dtype.
        quant_type, blocksize, double_quant: as ``nf4.quantize``.
        compute_dtype: dtype of the matmul; ``None`` picks bf16 on GPU and fp32 on CPU at each call.

    Example:
        >>> layer = LinearNF4.from_linear(nn.Linear(4096, 4096))
        >>> layer(torch.randn(2, 4096)).shape
        torch.Size([2, 4096])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        dtype = dtype or torch.get_default_dtype()
        device = torch.device(device) if device is not None else torch.get_default_device()
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        shape = (out_features, in_features)
        if device.type == "meta":
            self.set_weight(_placeholder(shape, quant_type, blocksize, double_quant, dtype, device))
            return
        # Same initialization as nn.Linear.reset_parameters, then quantized.
        w = torch.empty(shape, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.set_weight(fmt.quantize(w, quant_type, blocksize, double_quant))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearNF4:
        """Quantize an ``nn.Linear``'s weight into a new ``LinearNF4`` on the same device (the bias is copied)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        out = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=w.dtype,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
        )
        out.set_weight(fmt.quantize(w, quant_type, blocksize, double_quant))
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return out

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a ``QuantizedTensor`` (a view of the buffers: moves with the module). Kept between calls
        while the buffers are the same tensors (building it costs ~10 us, and a decode step asks hundreds of times)."""
        compiling = torch.compiler.is_compiling()  # traced code builds it: no state written from a graph
        cached = None if compiling else self.__dict__.get("_qweight")
        buffers = self._buffers
        if (
            cached is not None
            and cached.data is buffers["weight"]
            and all(getattr(cached, f) is buffers[f"weight_{f}"] for f in _FIELDS)
        ):
            return cached
        q = QuantizedTensor(
            data=self.weight,
            absmax=self.weight_absmax,
            quant_map=self.weight_quant_map,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            nested_absmax=self.weight_nested_absmax,
            nested_quant_map=self.weight_nested_quant_map,
            nested_offset=self.nested_offset,
        )
        if not compiling:
            self.__dict__["_qweight"] = q
        return q

    def set_weight(self, q: QuantizedTensor) -> None:
        """Replace the weight (format, blocksize and double quant may change; the shape may not)."""
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(q.shape)} does not fit {(self.out_features, self.in_features)}")
        # Non-persistent: the state dict entries are written by _save_to_state_dict, with bitsandbytes' keys.
        self.register_buffer("weight", q.data, persistent=False)
        for field in _FIELDS:
            self.register_buffer(f"weight_{field}", getattr(q, field), persistent=False)
        self.__dict__.pop("_qweight", None)
        self.quant_type, self.blocksize, self.weight_dtype = q.quant_type, q.blocksize, q.dtype
        self.nested_offset = q.nested_offset
        dq = q.nested_offset is not None
        offset = torch.tensor(q.nested_offset, dtype=torch.float32, device=q.device) if dq else None
        self.register_buffer("weight_nested_offset", offset, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = self.compute_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
        bias = self.bias
        if bias is not None and bias.dtype != compute_dtype:
            bias = bias.to(compute_dtype)
        # casts only where needed: each ``.to`` costs a few us even as a no-op, and a decode step makes hundreds
        xc = x if x.dtype == compute_dtype else x.to(compute_dtype)
        out = ops.matmul(xc, self.qweight, bias, self.weight_nested_offset)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LinearNF4:
        # Module.to(dtype) and .half() cast every floating buffer, but the quant state must stay fp32 (casting
        # it would change the weight): set the fp32 buffers aside and let them follow the packed data's device.
        fp32 = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        for name in fp32:
            del self._buffers[name]
        super()._apply(fn, recurse)
        for name, b in fp32.items():
            self._buffers[name] = b.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.qweight.state_dict(prefix + "weight"))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == key or k.startswith(key + ".")}
        if key not in mine:
            missing_keys.append(key)
        else:
            try:
                q = QuantizedTensor.from_state_dict(mine, key)
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise fmt.FormatError(
                        f"{key}: quant state says shape {tuple(q.shape)}, the layer is "
                        f"{(self.out_features, self.in_features)}"
                    )
            except fmt.FormatError as e:
                error_msgs.append(str(e))
            else:
                device = self.weight.device if self.weight.device.type != "meta" else q.device
                self.set_weight(q.to(device))
        rest = {k: v for k, v in state_dict.items() if k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.nested_offset is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}"
        )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern equal to it, to one of its prefixes or to one of its suffixes (by dots)."""
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) for p in patterns)


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip: Iterable[str] = ("lm_head",),
    only: Iterable[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace the model's ``nn.Linear`` layers by ``LinearNF4``, in place, one layer at a time.

    Each float weight is freed as soon as its layer is swapped (if nothing else holds it), so the peak is
    about the quantized size plus one float layer on top of what the model held already.

    Args:
        skip: module names to keep in float (a name, a prefix or a suffix by dots: "lm_head", "encoder.layer.0").
        only: if given, quantize only the Linear layers matching these names (same rule), minus ``skip``.

    Returns:
        The same model.
    """
    if quant_type not in codebook.CODEBOOKS:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {sorted(codebook.CODEBOOKS)}")
    if blocksize not in fmt.BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}; expected one of {fmt.BLOCKSIZES}")
    skip = tuple(skip)
    only = None if only is None else tuple(only)
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and not _matches(name, skip) and (only is None or _matches(name, only))
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LinearNF4.from_linear(getattr(parent, child), quant_type, blocksize, double_quant, compute_dtype)
        setattr(parent, child, layer)
    return model


class FusedLinearNF4(LinearNF4):
    """Several ``LinearNF4`` that read the same input, as one: their weights stacked by rows (``format.concat``),
    one matmul for all, then split. At decode each matmul costs launches of a few microseconds on a GPU, so
    q/k/v and gate/up fused cut an 8B Llama step from 7 matmuls a layer to 4 (docs/BENCHMARKS.md).

    ``forward`` returns the outputs side by side; ``part(x, i)`` returns one of them, computing the fused
    matmul once per input tensor and handing the other parts over as their layers ask for them (``FusedPart``).
    """

    def __init__(self, layers: Sequence[LinearNF4]) -> None:
        first = layers[0]
        for i, layer in enumerate(layers):
            if type(layer) is not LinearNF4:
                raise TypeError(f"layer {i} is a {type(layer).__name__}; only plain LinearNF4 layers fuse")
            if layer.compute_dtype != first.compute_dtype:
                raise ValueError(f"layer {i} computes in {layer.compute_dtype}, layer 0 in {first.compute_dtype}")
        q = fmt.concat([layer.qweight for layer in layers])
        has_bias = any(layer.bias is not None for layer in layers)
        super().__init__(q.shape[1], q.shape[0], has_bias, "meta", q.dtype, compute_dtype=first.compute_dtype)
        self.set_weight(q)
        if has_bias:  # a layer without one adds zeros
            biases = [
                layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features, device=q.device)
                for layer in layers
            ]
            self.bias = nn.Parameter(torch.cat([b.to(q.dtype) for b in biases]), requires_grad=False)
        self.sizes = [layer.out_features for layer in layers]
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._waiting: set[int] = set()

    def part(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's output for x. A new input (or a part asked for twice) runs the fused matmul; the outputs
        are dropped once every part has taken its own, so no activation outlives the step."""
        if x is not self._input or i not in self._waiting:
            self._outputs = self(x).split(self.sizes, dim=-1)
            self._input, self._waiting = x, set(range(len(self.sizes)))
        self._waiting.discard(i)
        out = self._outputs[i]
        if not self._waiting:
            self._input, self._outputs = None, ()
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sizes={self.sizes}"


class FusedPart(nn.Module):
    """Stands where one of the fused layers stood; its output is that layer's slice of the fused matmul."""

    def __init__(self, fused: FusedLinearNF4, index: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the fused layer is registered once, on the parent
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.part(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of the fused layer, out_features={self.out_features}"


PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fused_name(names: Sequence[str]) -> str:
    """q_proj, k_proj, v_proj -> qkv_proj; gate_proj, up_proj -> gate_up_proj (vLLM's and Phi-3's names)."""
    if all(n.endswith("_proj") for n in names):
        heads = [n.removesuffix("_proj") for n in names]
        return ("" if all(len(h) == 1 for h in heads) else "_").join(heads) + "_proj"
    return "fused_" + "_".join(names)


def fuse_projections(model: nn.Module, groups: Iterable[Sequence[str]] = PROJECTION_GROUPS) -> int:
    """Fuse, in place, each group of sibling ``LinearNF4`` layers that read the same input (by default Llama's
    q/k/v and gate/up projections) into one ``FusedLinearNF4`` (registered on their parent as e.g. ``qkv_proj``);
    ``FusedPart`` modules take the layers' places, so the model's own forward runs unchanged.

    For running a model: its state dict then has the fused layers' keys, which ``nf4.save_pretrained`` refuses
    (save before fusing). A group whose layers are not all plain ``LinearNF4`` (LoRA-wrapped, kept in float) or
    differ in input size or format is left as it is.

    Returns:
        How many groups were fused.
    """
    groups = [tuple(g) for g in groups]
    fused = 0
    for parent in list(model.modules()):
        for names in groups:
            layers = [getattr(parent, n, None) for n in names]
            if not all(type(m) is LinearNF4 for m in layers):
                continue
            try:
                layer = FusedLinearNF4(layers)
            except ValueError:  # different inputs or formats: these layers stay apart
                continue
            parent.add_module(_fused_name(names), layer)
            for i, name in enumerate(names):
                setattr(parent, name, FusedPart(layer, i))
            fused += 1
    return fused
