"""NF4-search: NF4's layout and levels with a per-block scale fitted by search instead of absmax (opt-in).

The bytes are NF4's, field for field: only the *value* stored in ``absmax`` changes. bitsandbytes and every
``nf4`` kernel decode it unchanged (``value = level[code] * absmax[block]``), so the decode matmul is as fast::

    data        uint8 [(n + 1) // 2, 1]   NF4 codes, first element in the high nibble (as format.py)
    absmax      fp32 [nblocks]             the fitted scale s_b (not max |x|), or 8-bit codes with double quant
    quant_map   fp32 [16]                  the NF4 levels; quant_state JSON says quant_type "nf4"

Fitting one block x (as llama.cpp's IQ4_NL and HQQ fit their scales): for each candidate s in
``absmax * SCALE_GRID`` take the codes c = nearest level to x / s (ties to the lower code, values beyond ±1
clip to the end levels) and keep the s with the least *weighted* squared error sum_i w_i (x_i - s level[c_i])²;
then refine s ``REFINE_STEPS`` times by weighted least squares for fixed codes,
s = sum w x level[c] / sum w level[c]², re-coding and keeping the refit only where the error drops.
The weights are llama.cpp's default importance when no calibration data is given (its k-quants):
w_i = rms(x) + |x_i|. Plain squared error (w = 1) lowers the weight error most but shrinks scales until the
block's largest weights clip, and those matter most to the loss: on SmolLM2 at block 64 it removed 11.5% of
NF4's Δ-perplexity, w = x² 12.9%, w = rms + |x| 20.6% (docs/QUALITY.md). The grid has both signs: NF4 has 8
positive levels and 7 negative, so a negative scale uses the mirrored codebook (as IQ4_NL does) and the stored
"absmax" may be negative. The weighted error never exceeds plain NF4's (s = absmax is in the grid). Quantizing
costs one pass per candidate (~70 passes); dequantizing is NF4's.
"""

from __future__ import annotations

import torch
from torch import nn

from nf4 import codebook
from nf4 import format as fmt
from nf4.format import QuantizedTensor
from nf4.nn import LinearNF4, _matches

# Candidate scales as fractions of the block's absmax, both signs; 1.0 (plain NF4) is included.
_MAGNITUDES = tuple(round(0.70 + 0.01 * i, 2) for i in range(36))  # 0.70 .. 1.05
SCALE_GRID: tuple[float, ...] = _MAGNITUDES + tuple(-m for m in _MAGNITUDES)
REFINE_STEPS = 2


def importance(x: torch.Tensor) -> torch.Tensor:
    """Per-element weight of the fit, x [nblocks, blocksize] -> same shape: rms of the block + |x|."""
    return x.square().mean(dim=1, keepdim=True).sqrt() + x.abs()


def fit_scales(x: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale of ``x`` [nblocks, blocksize] (fp32) minimising the weighted squared error (``importance``)
    on ascending ``levels``.

    Returns:
        (codes int32 [nblocks, blocksize], scales fp32 [nblocks]); an all-zero row gets scale 0 and the
        code of level 0.
    """
    levels = levels.to(x.device)
    mids = codebook.midpoints(levels).to(x.device)
    absmax = x.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    w = importance(x)

    def code(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.bucketize(x / scale[:, None], mids, out_int32=True)
        return c, ((levels[c] * scale[:, None] - x).square() * w).sum(dim=1)

    # The grid pass keeps only the best scale and error per row (no [nblocks, blocksize] copies per candidate).
    best_s = safe.clone()
    best_e = code(best_s)[1]
    for s in SCALE_GRID:
        e = code(safe * s)[1]
        better = e < best_e
        best_s = torch.where(better, safe * s, best_s)
        best_e = torch.where(better, e, best_e)
    best_c = code(best_s)[0]
    for _ in range(REFINE_STEPS):
        lv = levels[best_c]
        s = (w * x * lv).sum(dim=1) / (w * lv * lv).sum(dim=1).clamp_min(1e-30)
        s = torch.where(s != 0, s, best_s)
        c, e = code(s)
        better = e < best_e
        best_s = torch.where(better, s, best_s)
        best_e = torch.where(better, e, best_e)
        best_c = torch.where(better[:, None], c, best_c)
    return best_c, torch.where(absmax > 0, best_s, torch.zeros_like(best_s))


def quantize_search(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> QuantizedTensor:
    """Quantize to NF4 with searched per-block scales: a ``QuantizedTensor`` of quant_type ``"nf4"``.

    Args:
        tensor: fp32, fp16 or bf16, any shape, finite values.
        blocksize: one of ``format.BLOCKSIZES``.
        double_quant: store the scales in 8 bits as NF4 does (~4.127 bits/param at blocksize 64).

    Example:
        >>> q = quantize_search(torch.randn(256, 256))
        >>> q.quant_type, round(q.bits_per_param, 3)
        ('nf4', 4.127)
    """
    fmt._check_tensor(tensor)
    fmt._check_options("nf4", blocksize)
    flat = tensor.detach().reshape(-1).float()
    n = flat.numel()
    x = fmt._flush(torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize))
    fmt._check_finite(x.abs().amax(dim=1))
    codes, scales = fit_scales(x, codebook.levels("nf4"))
    codes = codes.view(-1)[: n + n % 2].int()  # an odd n keeps one padding code: the code of 0, as format.py
    q = QuantizedTensor(
        data=fmt._pack(codes).view(-1, 1),
        absmax=scales,
        quant_map=codebook.levels("nf4").to(flat.device),
        quant_type="nf4",
        blocksize=blocksize,
        shape=tensor.shape,
        dtype=tensor.dtype,
    )
    return fmt.double_quantize(q) if double_quant else q


def quantize_model_search(
    model: nn.Module, blocksize: int = 64, double_quant: bool = True, skip: tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """As ``nf4.quantize_model`` (in place, ``nn.Linear`` -> ``LinearNF4``), with NF4-search weights."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        w = linear.weight.detach()
        layer = LinearNF4(linear.in_features, linear.out_features, linear.bias is not None, "meta", w.dtype)
        layer.set_weight(quantize_search(w, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        setattr(parent, child, layer)
    return model
