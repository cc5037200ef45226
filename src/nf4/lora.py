"""LoRA adapters on a frozen 4-bit base (QLoRA), saved and loaded in PEFT's format.

A targeted layer ``y = base(x)`` becomes ``y = base(x) + (alpha / r) * B(A(dropout(x)))``. The base stays a
``LinearNF4`` (4-bit buffers, never a float copy); only A ``[r, in]`` and B ``[out, r]`` are trainable. B starts at
zero, so a fresh adapter leaves the model unchanged. The module tree and the file layout are PEFT's::

    q_proj.base_layer                                  the LinearNF4 (or nn.Linear)
    q_proj.lora_A.default.weight / lora_B.default...   in memory, as PEFT names them
    adapter_model.safetensors: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   (PEFT's keys)
    adapter_config.json: peft_type "LORA", r, lora_alpha, lora_dropout, target_modules, ...

so ``peft.PeftModel.from_pretrained(float_base, folder)`` loads what ``save_adapter`` writes, and back.

``set_fused(model)`` routes each layer over a ``LinearNF4`` through ``_LoraMatmul``: base and adapter in one
autograd node that saves only x (and the dropout mask), in the compute dtype — the training path on GPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nf4 import format as fmt
from nf4 import ops
from nf4.nn import FusedLinearNF4, LinearNF4

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_NAME = "default"  # PEFT's adapter name in memory; dropped from the keys on disk
_PEFT_PREFIX = "base_model.model."
ADAPTER_DTYPES = (torch.float32, torch.bfloat16)


class AdapterError(ValueError):
    """An adapter that does not fit the model, or a folder that is not a LoRA adapter."""


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; QLoRA's defaults (r 64, alpha 16, dropout 0.05, every linear layer but lm_head).

    Args:
        target_modules: ``"all-linear"`` or module names matched as PEFT does (the name or its last dotted parts).
        dtype: the adapters' dtype, float32 or bfloat16 (the base keeps its own compute dtype).
    """

    r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    dtype: torch.dtype = torch.float32
    exclude_modules: list[str] = field(default_factory=lambda: ["lm_head"])

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter dtype must be float32 or bfloat16, got {self.dtype}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, with PEFT's attribute names.

    Example:
        >>> layer = LoraLinear(LinearNF4(576, 576), LoraConfig(r=8))
        >>> layer(torch.randn(2, 576)).shape
        torch.Size([2, 576])
    """

    def __init__(self, base_layer: nn.Module, config: LoraConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, (LinearNF4, nn.Linear)):
            raise TypeError(f"LoRA wraps LinearNF4 or nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling = config.r, config.scaling
        device = base_layer.weight.device
        # ModuleDicts keyed by the adapter name: the state dict then reads lora_A.default.weight, as PEFT's.
        self.lora_A = nn.ModuleDict({ADAPTER_NAME: nn.Linear(self.in_features, config.r, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({ADAPTER_NAME: nn.Linear(config.r, self.out_features, bias=False, device=device)})
        self.lora_dropout = nn.ModuleDict(
            {ADAPTER_NAME: nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()}
        )
        # PEFT's init: A as nn.Linear's default (Kaiming uniform, a=sqrt(5)), B zero.
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER_NAME].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[ADAPTER_NAME].weight)
        self.lora_A.to(config.dtype)
        self.lora_B.to(config.dtype)
        self.fused = False  # set_fused: base + adapter as one _LoraMatmul node (LinearNF4 bases only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A[ADAPTER_NAME], self.lora_B[ADAPTER_NAME]
        if self.fused and isinstance(self.base_layer, LinearNF4):
            base = self.base_layer
            dtype = base.compute_dtype or (torch.bfloat16 if x.is_cuda else torch.float32)
            bias = None if base.bias is None else base.bias.to(dtype)
            drop = self.lora_dropout[ADAPTER_NAME]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            q, offset = base.qweight, base.weight_nested_offset
            y = _LoraMatmul.apply(x.to(dtype), a.weight, b.weight, q, offset, bias, self.scaling, p)
            return y.to(x.dtype)
        y = self.base_layer(x)
        h = self.lora_dropout[ADAPTER_NAME](x.to(a.weight.dtype))
        return y + (b(a(h)) * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """fp32 ``scaling * B @ A`` ``[out, in]``: what merging adds to the base weight."""
        a, b = self.lora_A[ADAPTER_NAME].weight.float(), self.lora_B[ADAPTER_NAME].weight.float()
        return (b @ a) * self.scaling


class _LoraMatmul(torch.autograd.Function):
    """``y = x Wᵀ + bias + s·(d(x) Aᵀ) Bᵀ`` as one autograd node over a 4-bit ``W`` (``d``: dropout, keep mask m).

    The unfused layer keeps an fp32 copy of x for A's gradient, an fp32 ``[M, out]`` LoRA output and three
    elementwise passes over it; here the adapter rides on the base GEMM (``addmm_`` into its output) and the
    node saves x (compute dtype), ``v = s·d(x)Aᵀ`` ``[M, r]`` and the mask (1 byte an element, only with
    dropout) — never a float W: backward dequantizes it again, as ``nf4::matmul`` does. With ``g = ∂L/∂y``::

        u = s·g B                 [M, r]
        grad_x = g W + (u A) ⊙ m / (1 - p)
        grad_A = uᵀ d(x)          [r, in]
        grad_B = gᵀ v             [out, r]

    Products run in x's dtype (bf16 on GPU: cuBLAS accumulates in fp32, as autocast would); the adapter
    gradients come back in the adapters' dtype.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        q: fmt.QuantizedTensor,
        offset: torch.Tensor | None,
        bias: torch.Tensor | None,
        scaling: float,
        p: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        mask = torch.empty_like(x2, dtype=torch.bool).bernoulli_(1 - p) if p > 0 else None
        h = x2 if mask is None else x2 * mask / (1 - p)
        v = (h @ a.to(x.dtype).T).mul_(scaling)
        y = ops.matmul(x2, q, bias, offset).addmm_(v, b.to(x.dtype).T)
        ctx.save_for_backward(x2, v, mask, a, b)
        ctx.q, ctx.offset, ctx.scaling, ctx.p = q, offset, scaling, p
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        x2, v, mask, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        a_c = a.to(g.dtype)
        u = (g @ b.to(g.dtype)).mul_(ctx.scaling)
        grad_x = grad_a = grad_b = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ ops.dequantize(ctx.q, g.dtype, ctx.offset)
            if mask is None:
                grad_x.addmm_(u, a_c)
            else:
                # not add_(..., alpha=): torch.compile (2.13) dropped the alpha in this backward
                grad_x.add_((u @ a_c) * mask / (1 - ctx.p))
            grad_x = grad_x.view(*grad.shape[:-1], x2.shape[-1])
        if ctx.needs_input_grad[1]:
            h = x2 if mask is None else x2 * mask / (1 - ctx.p)
            grad_a = (u.T @ h).to(a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g.T @ v).to(b.dtype)
        if ctx.needs_input_grad[5]:
            grad_bias = g.sum(0)
        return grad_x, grad_a, grad_b, None, None, grad_bias, None, None


# ------------------------------------------------------------------------------------------------ attach


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the layers to wrap: PEFT's rule (exact name or dotted suffix), lm_head and output layers excluded."""
    linears = [n for n, m in model.named_modules() if isinstance(m, (LinearNF4, nn.Linear)) and n]
    linears = [n for n in linears if not any(n == e or n.endswith("." + e) for e in config.exclude_modules)]
    if config.target_modules == "all-linear":
        return linears
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    found = [n for n in linears if any(n == t or n.endswith("." + t) for t in wanted)]
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        leaves = sorted({n.rpartition(".")[2] for n in linears})
        raise ValueError(f"target_modules {missing} match no linear layer; the model has {leaves}")
    return found


def _output_in_input_dtype(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(args[0].dtype) if args and isinstance(args[0], torch.Tensor) else output


def add_lora(model: nn.Module, config: LoraConfig | None = None) -> nn.Module:
    """Freeze the model and wrap its target layers with LoRA adapters, in place.

    Every existing parameter is frozen; norm weights are kept in fp32 (they are tiny and bf16 norms lose
    precision), and each norm's output is cast back to its input's dtype so that the layers after it (an
    unquantized lm_head in bf16, say) see the model's dtype. The 4-bit weights are untouched: no float copy
    of the base is made.

    Returns:
        The same model; its trainable parameters are exactly the adapters.
    """
    config = config or LoraConfig()
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("the model has LoRA adapters already")
    if any(isinstance(m, FusedLinearNF4) for m in model.modules()):  # its parts would bypass an adapter on it
        raise ValueError("the model has fused projections (nf4.fuse_projections): add adapters before fusing")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if _is_norm(m):
            m.float()
            m.register_forward_hook(_output_in_input_dtype)
    names = _targets(model, config)
    if not names:
        raise ValueError("the model has no linear layers to put LoRA adapters on")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoraLinear(getattr(parent, child), config)
        setattr(parent, child, layer.train(parent.training))  # an eval-mode model gets no dropout
    model.lora_config = config
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters in a fixed order (module order): what the optimizer trains."""
    return [p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def set_fused(model: nn.Module, enabled: bool = True) -> int:
    """Route every LoraLinear over a LinearNF4 through ``_LoraMatmul`` (or back); returns how many layers.

    Same maths as the unfused path, less memory and fewer kernels: the GPU training path. Off by default so
    that the CPU path (fp32, measured in docs/QLORA.md) stays as it is.
    """
    layers = [m for _, m in lora_layers(model) if isinstance(m.base_layer, LinearNF4)]
    for m in layers:
        m.fused = enabled
    return len(layers)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: the frozen inputs need no grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} has no activation checkpointing (not a transformers model)")
    if hasattr(model, "config"):
        model.config.use_cache = False


# ---------------------------------------------------------------------------------------------- save / load


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's on-disk keys (``base_model.model.<name>.lora_A.weight``)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A[ADAPTER_NAME].weight.detach().cpu().contiguous()
            out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B[ADAPTER_NAME].weight.detach().cpu().contiguous()
    if not out:
        raise ValueError("the model has no LoRA adapters (call nf4.lora.add_lora first)")
    return out


def _peft_config(model: nn.Module, config: LoraConfig, base_name: str | None) -> dict[str, Any]:
    leaves = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, LoraLinear)})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": leaves,
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }


def write_adapter(folder: Path, model: nn.Module, base_name: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an existing folder (not atomic by itself)."""
    config: LoraConfig = model.lora_config
    (folder / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(model, config, base_name), indent=2))
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(model: nn.Module, out: str | os.PathLike, base_name: str | None = None) -> Path:
    """Save the adapter in PEFT's format, atomically: a temporary folder beside ``out``, then a rename.

    An existing ``out`` is replaced only once the new folder is complete.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_adapter(tmp, model, base_name)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def replace_dir(new: Path, out: Path) -> None:
    """Move the complete folder ``new`` to ``out``; an old ``out`` is moved aside first and removed after."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old)
    else:
        os.replace(new, out)


def read_adapter_config(folder: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of a PEFT LoRA folder (ours or PEFT's)."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (expected a LoRA adapter folder)")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{path}: peft_type {raw.get('peft_type') if isinstance(raw, dict) else raw!r}; "
            "only LoRA adapters are supported"
        )
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise AdapterError(f"{path}: {key} is set; nf4 supports plain LoRA only")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise AdapterError(f"{path}: per-layer rank_pattern/alpha_pattern are not supported")
    try:
        return LoraConfig(
            r=int(raw["r"]),
            lora_alpha=float(raw["lora_alpha"]),
            lora_dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=raw["target_modules"],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: invalid LoRA config ({type(e).__name__}: {e})") from e


def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS} (nf4 reads safetensors adapters only, never pickle)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from e


def load_adapter_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """Copy PEFT-keyed adapter weights into the model's LoRA layers; every key and shape must fit exactly."""
    mine = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    expected = {}
    for name, m in mine.items():
        for part in ("lora_A", "lora_B"):
            expected[f"{_PEFT_PREFIX}{name}.{part}.weight"] = getattr(m, part)[ADAPTER_NAME].weight
    # PEFT may store keys with the adapter name in them (older versions): accept both spellings.
    weights = {k.replace(f".{ADAPTER_NAME}.weight", ".weight"): v for k, v in weights.items()}
    unknown = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unknown or missing:
        what = f"unexpected key {unknown[0]!r}" if unknown else f"missing key {missing[0]!r}"
        raise AdapterError(
            f"{where}: {what} ({len(unknown)} unexpected, {len(missing)} missing): "
            "the adapter was made for another model or other target modules"
        )
    for key, target in expected.items():
        t = weights[key]
        if tuple(t.shape) != tuple(target.shape):
            raise AdapterError(
                f"{where}: {key} has shape {tuple(t.shape)}, the model expects {tuple(target.shape)}: "
                "the adapter was made for another model's shapes"
            )
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(weights[key])


def load_adapter(model: nn.Module, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Put a saved LoRA adapter (ours or PEFT's) on a model, in place; everything is checked before any change.

    Raises:
        AdapterError: no adapter in ``folder``, or one made for another model's shapes or layers.
    """
    config = read_adapter_config(folder)
    config.dtype = dtype
    weights = read_adapter_weights(folder)
    # Check on a throw-away skeleton of the adapters first, so a bad adapter leaves the model as it was.
    try:
        names = _targets(model, config)
    except ValueError as e:
        raise AdapterError(f"{folder}: {e}") from e
    expected = {}
    for name in names:
        base = model.get_submodule(name)
        expected[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = (config.r, base.in_features)
        expected[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = (base.out_features, config.r)
    got = {k.replace(f".{ADAPTER_NAME}.weight", ".weight"): tuple(v.shape) for k, v in weights.items()}
    for key, shape in expected.items():
        if key in got and got[key] != shape:
            raise AdapterError(
                f"{folder}: {key} has shape {got[key]}, the model expects {shape}: "
                "the adapter was made for another model's shapes"
            )
    if set(got) != set(expected):
        bad = sorted(set(got) ^ set(expected))[0]
        raise AdapterError(
            f"{folder}: key {bad!r} is in only one of the adapter and the model: "
            "the adapter was made for another model or other target modules"
        )
    add_lora(model, config)
    load_adapter_weights(model, weights, str(folder))
    return model


# ------------------------------------------------------------------------------------------------- merge


def merge_lora(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fold every adapter into its base, in place: each LoraLinear becomes ``nn.Linear(W + scaling * B @ A)``.

    A 4-bit base is dequantized once per layer (in fp32) for this, so the result is a float model in ``dtype``;
    the sum is formed in fp32 and rounded once.
    """
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoraLinear):
            continue
        base = m.base_layer
        w = fmt.dequantize(base.qweight, torch.float32) if isinstance(base, LinearNF4) else base.weight.float()
        merged = nn.Linear(m.in_features, m.out_features, bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter((w + m.delta_weight().to(w.device)).to(dtype), requires_grad=False)
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every LinearNF4 by an ``nn.Linear`` holding its dequantized weight, in place (a float base)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LinearNF4):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            linear.weight = nn.Parameter(fmt.dequantize(m.qweight, dtype), requires_grad=False)
            if m.bias is not None:
                linear.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
    return model


def lora_layers(model: nn.Module) -> Iterable[tuple[str, LoraLinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))


def config_dict(config: LoraConfig) -> dict[str, Any]:
    """The config as JSON-ready values (dtype by name)."""
    d = asdict(config)
    d["dtype"] = str(config.dtype).removeprefix("torch.")
    return d
