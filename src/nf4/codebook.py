"""The 4-bit code tables: NF4, bitsandbytes' FP4, symmetric INT4, and the NormalFloat-k generator.

A codebook maps a 4-bit code (0..15) to a level in [-1, 1]; a block's values are stored as the code of
the nearest level after dividing by the block's absmax. NF4 and FP4 are bitsandbytes' formats: their
levels *and* their decision thresholds are fixed here, because byte-exact compatibility depends on the
exact fp32 thresholds bitsandbytes' CUDA kernels compare against (``format.py`` uses them; no other
module hard-codes a level or a threshold).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

# NF4 (QLoRA, bitsandbytes): 7 negative levels, an exact 0, 8 positive levels, ends at ±1.
# bitsandbytes' hard-coded values are canonical; `normal_float(4)` regenerates them to ~2e-7.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# bitsandbytes "fp4" (not OCP E2M1): sign bit 0b1000 and a 3-bit magnitude code indexed by bit pattern.
# Magnitudes of codes 0..7: {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_LEVELS: tuple[float, ...] = tuple(m / 12 for m in _FP4_MAGNITUDES) + tuple(-m / 12 for m in _FP4_MAGNITUDES)

# FP4 decision thresholds on |x| (bitsandbytes' CUDA literals: decimal truncations of the magnitude
# midpoints, so not exactly the midpoints; each is its nearest fp32), and the magnitude code of each
# rank 0..7 (ascending magnitude).
FP4_MAGNITUDE_THRESHOLDS: tuple[float, ...] = (
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
)  # fmt: skip
FP4_CODE_OF_RANK: tuple[int, ...] = (0, 1, 6, 7, 4, 5, 2, 3)

# Symmetric INT4: k/7 for k = -7..7 (15 levels; code 15 is never produced and decodes to 1.0).
INT4_LEVELS: tuple[float, ...] = tuple(k / 7 for k in range(-7, 8)) + (1.0,)


def normal_float(bits: int) -> torch.Tensor:
    """NormalFloat-k levels (fp32, ascending, ``2**bits`` entries) by the QLoRA/bitsandbytes construction.

    Levels are normal quantiles: ``2**(k-1)`` positive at ``linspace(offset, 0.5, 2**(k-1)+1)[:-1]``,
    ``2**(k-1)-1`` negative at ``linspace(offset, 0.5, 2**(k-1))[:-1]``, and an exact 0, scaled to max 1.
    ``offset = 1 - (1/(2(2**k-1)) + 1/(2*2**k)) / 2`` puts the outermost quantile half-way between the
    two natural choices (0.9677083 for k=4, as the paper uses). Quantiles are taken in float64 on fp32
    grid points, as bitsandbytes does, so ``normal_float(4)`` matches ``NF4_LEVELS`` to ~2e-7.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"NormalFloat bits must be in 2..8, got {bits}")
    half = 2 ** (bits - 1)
    offset = 1 - 0.5 * (1 / (2 * (2**bits - 1)) + 1 / (2 * 2**bits))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float().sort().values
    return levels / levels.max()


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between ascending levels, exactly as bitsandbytes' CUDA kernel compares.

    bitsandbytes wrote each float64 midpoint into its source as a shortest-repr decimal literal, which the
    compiler rounds (once) to the nearest fp32. Four of NF4's midpoints lie exactly half-way between two
    fp32 values, and there the decimal's last digit decides the side, not ties-to-even; so we round the same
    decimal string the same way (checked against the CUDA fixtures).
    """
    mids = ((levels.double()[1:] + levels.double()[:-1]) / 2).tolist()
    return torch.tensor([_nearest_f32(repr(m)) for m in mids], dtype=torch.float32)


def _nearest_f32(decimal: str) -> float:
    """The fp32 value nearest to a decimal string (a single rounding, unlike str -> float64 -> fp32)."""
    exact = Fraction(decimal)
    guess = torch.tensor(float(exact), dtype=torch.float32)
    down, up = torch.nextafter(guess, torch.tensor(-math.inf)), torch.nextafter(guess, torch.tensor(math.inf))
    candidates = [down, guess, up]
    return min((c.item() for c in candidates), key=lambda c: abs(Fraction(c) - exact))


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values), used for double quantization.

    For exponent e = 0..6 the map holds ``2**e`` evenly spaced fractions in (0.1, 1), scaled by
    ``10**(e-6)``, with both signs (127 + 127 values), plus 0 and 1.0. Each fraction is the midpoint of
    consecutive points of ``linspace(0.1, 1, 2**e + 1)``, computed in fp32 as bitsandbytes does.
    """
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        frac = (grid[:-1] + grid[1:]) / 2.0
        scaled = frac * torch.tensor(10.0 ** (e - 6), dtype=torch.float32)
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


# Registry: quant_type -> levels by code. Only "nf4" and "fp4" are bitsandbytes formats.
CODEBOOKS: dict[str, tuple[float, ...]] = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS, "int4": INT4_LEVELS}
BNB_QUANT_TYPES = ("nf4", "fp4")


def levels(quant_type: str) -> torch.Tensor:
    """The 16 levels (fp32, indexed by code) of a registered 4-bit quant type."""
    if quant_type not in CODEBOOKS:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {sorted(CODEBOOKS)}")
    return torch.tensor(CODEBOOKS[quant_type], dtype=torch.float32)


def widest_gap(quant_type: str) -> float:
    """Largest distance between adjacent levels: the worst-case rounding error is half of it (× absmax)."""
    lv = sorted(set(CODEBOOKS[quant_type]))
    return max(b - a for a, b in zip(lv, lv[1:], strict=False))
