"""The fast QLoRA training path: the LoRA-fused base matmul plus liger-kernel's fused kernels on a Llama.

Each step is switched on separately, so the benchmark can add them one at a time (``STEPS``, in that order):

- ``lora``: every LoraLinear over a LinearNF4 runs as one ``_LoraMatmul`` node (``nf4.lora.set_fused``): the
  adapter rides on the base GEMM and only x is saved. Any device.
- ``loss``: ``loss_sum`` stops the model at its last hidden state and gives it, with ``lm_head``'s weight, to
  liger's fused linear cross-entropy, which forms the logits a chunk of tokens at a time and their gradient in
  the same pass: the ``[tokens, vocab]`` logits (fp32 in HF's loss: 1 GiB at 8192 tokens x 32000) never exist.
- ``norm``, ``swiglu``, ``rope``: Llama's RMSNorm, ``down(silu(gate(x)) * up(x))`` and rotary embedding as one
  Triton kernel each way, instead of 4-8 elementwise kernels. The replaced modules keep their children and
  parameter names, so state dicts and adapter keys do not change.
- ``compile``: ``torch.compile`` each decoder layer's ``forward`` (``model.get_decoder().layers``). The eager step
  of a 1.1B Llama is host-bound: on an H200, ~300 ms of Python a step against ~134 ms of GPU work, ~150 us of host
  time per nf4 matmul or Triton launch. A compiled layer runs as one graph call. Every layer has the same code and
  shapes, and the 4-bit weights' offsets reach the ops as tensors (``LinearNF4.weight_nested_offset``), so one
  compile serves all layers; it still costs tens of seconds on the first step. transformers' checkpoint is traced
  into the graph, and ``_RecomputeWholeLayer`` makes the partitioner recompute the whole layer in its backward
  graph, so the layer keeps only its inputs, as eager checkpointing does. Any device; opt-in (its first step
  compiles); with it ``default_steps`` leaves ``norm`` and ``rope`` to inductor. On an H200, 1.1B Llama: 2.24x
  the tokens/s of HF + PEFT + bitsandbytes at 0.476x its peak memory (docs/BENCHMARKS.md).

The liger steps need CUDA and the ``liger-kernel`` package (``pip install nf4[triton]``); liger's Triton kernels
do not run on CPU (under ``TRITON_INTERPRET=1`` its loss and rope do, its norm and SwiGLU do not), so on CPU
the default is the plain path. ``rope`` rebinds ``apply_rotary_pos_emb`` in transformers' Llama module, for the
whole process: CUDA tensors go to liger, others to the original.

Example:
    >>> fused.enable(model)                      # every step that pays on this model's device
    >>> loss, n = fused.loss_sum(model, ids, mask, labels)   # with "loss" on: no logits
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils.checkpoint import CheckpointPolicy

from nf4 import lora

STEPS = ("lora", "loss", "norm", "swiglu", "rope", "compile")
LIGER_STEPS = ("loss", "norm", "swiglu", "rope")
COMPILED_BY_INDUCTOR = ("norm", "rope")  # liger steps left out under compile (default_steps says why)
_MODEL_TYPES = ("llama",)  # where the liger steps are checked to be the same maths (SmolLM2 is a Llama)


def has_liger() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _device(model: nn.Module) -> torch.device:
    return next(model.buffers()).device


def _liger_problem(model: nn.Module) -> str | None:
    """Why the liger steps cannot run on this model, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _MODEL_TYPES:
        return f"liger's kernels are wired for {_MODEL_TYPES} models here, not {model_type!r}"
    if _device(model).type != "cuda":
        return f"liger's kernels are Triton GPU kernels; the model is on {_device(model).type}"
    if not has_liger():
        return "liger-kernel is not installed (pip install 'nf4[triton]')"
    if not isinstance(model.get_output_embeddings(), nn.Linear):
        return "the fused loss needs a float lm_head (nn.Linear)"
    return None


def default_steps(model: nn.Module, requested: bool | None = None, compile: bool = False) -> tuple[str, ...]:
    """The steps for ``nf4 finetune --fused`` (True), ``--no-fused`` (False) or neither (None), ``--compile``.

    None picks every step that pays on the model's device: ``lora`` and the liger steps on CUDA with liger
    installed, ``lora`` alone on CUDA without it, none on CPU (whose plain path is the measured one in
    docs/QLORA.md). ``compile`` is opt-in (its first step compiles for tens of seconds) and drops ``norm`` and
    ``rope`` (``COMPILED_BY_INDUCTOR``): inductor fuses those itself, while liger's kernels inside a compiled graph
    cost host time and have their inputs copied first (torch cannot read which arguments they write). On an H200
    (one call): 186 ms a step with every liger kernel compiled in, 143 ms with none; liger's SwiGLU, kept, takes
    0.17 GiB off the peak (docs/BENCHMARKS.md).

    Raises:
        ValueError: ``requested`` is True and the liger steps cannot run (the message says why).
    """
    problem = _liger_problem(model)
    if requested and problem:
        raise ValueError(f"--fused: {problem}")
    if requested is False:
        steps: tuple[str, ...] = ()
    else:
        steps = ("lora", *LIGER_STEPS) if problem is None else ("lora",) if _device(model).type == "cuda" else ()
    if compile:
        return (*(s for s in steps if s not in COMPILED_BY_INDUCTOR), "compile")
    return steps


def enable(model: nn.Module, steps: Iterable[str] | None = None) -> nn.Module:
    """Switch on the given fast steps (default: ``default_steps(model)``) on a model with LoRA adapters, in place.

    Raises:
        ValueError: an unknown step, or a liger step where liger cannot run (the message says why).
    """
    steps = default_steps(model) if steps is None else tuple(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown fused step(s) {unknown}; expected some of {STEPS}")
    problem = _liger_problem(model) if any(s in LIGER_STEPS for s in steps) else None
    if problem:
        raise ValueError(f"cannot enable {[s for s in steps if s in LIGER_STEPS]}: {problem}")
    if "lora" in steps:
        lora.set_fused(model, True)
    _replace_modules(model, norm="norm" in steps, swiglu="swiglu" in steps)
    if "rope" in steps:
        _patch_rope()
    if "compile" in steps:
        for layer in model.get_decoder().layers:  # the bound forward: transformers' checkpoint traced in
            layer.forward = torch.compile(layer.forward, backend=_inductor_recomputing_whole_layers)
    model.nf4_fused = tuple(s for s in STEPS if s in steps or s in getattr(model, "nf4_fused", ()))
    return model


class _RecomputeWholeLayer(CustomGraphPass):
    """Joint-graph pass: every forward node of a checkpointed layer gets the checkpoint's recompute tag.

    transformers (>= 5) checkpoints inside the layer class's ``forward``, so a compiled layer traces its checkpoint
    into the graph (``tag_activation_checkpoint``), and AOTAutograd's partitioner recomputes the nodes tagged
    recompute. Under torch 2.11 the tags miss the nodes inside an ``autograd.Function`` and the Triton kernels of
    a ``triton_op``; the partitioner may not recompute an untagged Triton kernel, so it saved each dequantized
    weight (and more): 7.4 GiB at the 1.1B benchmark on an H200 against 2.5 eager. Spreading the tag from a
    node's tagged neighbours, to a fixpoint, restores what eager checkpointing keeps (the layer's inputs) in one
    compiled backward. Nodes that need the gradients are backward and left alone. Dropout masks drawn in a recomputed
    layer come out the same (tests/test_fused.py checks the gradient against the loss's change along it).
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        backward: set[torch.fx.Node] = set()
        for node in graph.nodes:  # topological order: a node after any tangent-dependent input is backward
            if (node.op == "placeholder" and node.name.startswith("tangents")) or any(
                a in backward for a in node.all_input_nodes
            ):
                backward.add(node)
        forward = [n for n in graph.nodes if n.op == "call_function" and n not in backward]
        changed = True
        while changed:
            changed = False
            for node in forward:
                if node.meta.get("recompute") is not None:
                    continue
                near = [*node.all_input_nodes, *(u for u in node.users if u not in backward)]
                tagged = next((m for m in near if m.meta.get("recompute") in _RECOMPUTE), None)
                if tagged is not None:
                    node.meta["recompute"] = tagged.meta["recompute"]
                    node.meta["ac_graph_id"] = tagged.meta.get("ac_graph_id")
                    changed = True

    def uuid(self) -> str:  # inductor's cache key: this file's text
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


_RECOMPUTE = (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)


def _inductor_recomputing_whole_layers(gm: torch.fx.GraphModule, example_inputs: list) -> Callable[..., Any]:
    """Inductor with ``_RecomputeWholeLayer`` on the joint graph; one function, so every layer shares a graph (a
    backend made per ``torch.compile`` call, as ``options=`` makes, would compile each layer anew).

    Checkpointing from outside the graph instead (a plain non-reentrant checkpoint around the compiled body) keeps
    as little, but runs the forward twice as separate graph calls: 230 ms a step against 153-178 ms at the 1.1B
    benchmark (H200, docs/BENCHMARKS.md).
    """
    from torch._inductor.compile_fx import compile_fx

    with torch._inductor.config.patch(joint_custom_pre_pass=_RecomputeWholeLayer()):
        return compile_fx(gm, example_inputs)


def saved_for_backward(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of activations that ``forward()`` keeps for backward outside eager checkpoints; runs its backward.

    Distinct storages, the model's own parameters and buffers left out. Tensors saved inside an eager checkpoint go
    to the checkpoint's hooks and are not counted; a compiled layer whose checkpoint is traced into its graph saves
    through ``ctx.save_for_backward``, so what its partitioner keeps shows here. With checkpointing that holds,
    this is the layer inputs plus what runs outside the layers (the loss's inputs).
    """
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.backward()
    return sum(storages.values())


def loss_sum(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies in fp32, number of predicted tokens), without forming the logits.

    The same quantity as ``nf4.train.loss_sum``: position t predicts ``labels[t + 1]``.
    """
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    head = model.get_output_embeddings()
    hidden = out.last_hidden_state[:, :-1].flatten(0, 1).to(head.weight.dtype)  # [B*(S-1), H]
    labels = labels[:, 1:]
    loss = liger_fused_linear_cross_entropy(
        hidden, head.weight, labels.flatten(), bias=head.bias, ignore_index=ignore_index, reduction="sum"
    )
    return loss.float(), int((labels != ignore_index).sum())


# ------------------------------------------------------------------------------------------ norm, MLP, rope


class FusedRMSNorm(nn.Module):
    """Llama's RMSNorm as liger's kernel: ``w · x / sqrt(mean(x²) + eps)`` in fp32, out in x's dtype.

    The weight stays the norm's own (fp32 after ``add_lora``), under the same name.
    """

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_rms_norm

        return liger_rms_norm(x, self.weight, self.variance_epsilon)


class FusedSwiGLU(nn.Module):
    """Llama's MLP, ``down(silu(gate(x)) * up(x))``, with ``silu(a) * b`` as one liger kernel each way.

    Holds the MLP's own ``gate_proj``/``up_proj``/``down_proj`` (LoraLinear or LinearNF4), under the same names.
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_swiglu

        return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def _replace_modules(model: nn.Module, norm: bool, swiglu: bool) -> None:
    """Swap Llama's RMSNorm and MLP modules for the fused ones, in place (the parameters move, not copied)."""
    act = getattr(getattr(model, "config", None), "hidden_act", None)
    if swiglu and act not in ("silu", "swish"):
        raise ValueError(f"the fused SwiGLU needs hidden_act silu, the model has {act!r}")
    for name, m in list(model.named_modules()):
        kind = type(m).__name__
        if norm and kind.endswith("RMSNorm") and not isinstance(m, FusedRMSNorm):
            new: nn.Module | None = FusedRMSNorm(m)
        elif swiglu and kind.endswith("MLP") and not isinstance(m, FusedSwiGLU):
            new = FusedSwiGLU(m)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new.train(m.training))


def _patch_rope() -> None:
    """Rebind Llama's ``apply_rotary_pos_emb`` (looked up by the attention at each call) to a CUDA/liger switch."""
    from transformers.models.llama import modeling_llama

    if getattr(modeling_llama.apply_rotary_pos_emb, "_nf4_fused", False):
        return
    original = modeling_llama.apply_rotary_pos_emb

    def apply_rotary_pos_emb(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not q.is_cuda:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        from liger_kernel.transformers.functional import liger_rope

        return liger_rope(q, k, cos, sin, None, unsqueeze_dim)

    apply_rotary_pos_emb._nf4_fused = True
    modeling_llama.apply_rotary_pos_emb = apply_rotary_pos_emb
