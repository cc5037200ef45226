"""The 4-bit quality lab: formats side by side on a real model (``nf4 eval``).

Every format is simulated the same way: each ``nn.Linear`` weight but ``lm_head`` is replaced by
``dequantize(quantize(W))`` in fp32, then the model is scored, then the float weight is put back.

    formats     nf4, fp4, int4                  format.py itself (bitsandbytes' bytes)
                nf2 .. nf8                      codebook.normal_float(k), k bits a code
                af4                             AbnormalFloat-4: levels fitted to the block size (see abnormal_float)
                nf4-search                      NF4 with searched per-block scales (nf4.search, opt-in)
                int4-asym                       uniform 16 levels between the block's min and max (like GGUF Q4_1)
                <name>-dq                       the same with double-quantized scales (not int4-asym)
    scores      causal LM:   perplexity of non-overlapping windows of ``context`` tokens of a text
                other model: cosine similarity of mean-pooled sentence embeddings to the float model's
    per layer   weight MSE, relative MSE (MSE / mean W²), SQNR = 10 log10(sum W² / sum (W - Ŵ)²) dB
    per format  code-usage histogram and its entropy (bits)

The generic k-bit quantizer follows format.py's rules: one fp32 absmax per block of the flattened tensor,
codes = nearest level to x / absmax with ties to the lower level (``codebook.midpoints``).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nf4 import checkpoint, codebook
from nf4 import format as fmt
from nf4.search import fit_scales

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
DEFAULT_FORMATS = "nf4,nf4-dq,fp4,int4,af4,nf3,nf4-search,nf4-search-dq"
BNB_FORMATS = ("nf4", "fp4", "int4")
_NF_RE = re.compile(r"nf([2-8])")


class EvalError(ValueError):
    """Input the lab cannot score: an unknown format, a text too short, a model without the head it needs."""


# ----------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Format:
    """A format name parsed: ``base`` (``nf4``, ``nf3``, ``af4``, ...), code bits, double quant or not."""

    name: str
    base: str
    bits: int
    double_quant: bool

    def bits_per_param(self, numel: int, blocksize: int) -> float:
        """Code bits plus scale bits (constants included: nested scales, the offset) over ``numel`` weights."""
        nblocks = -(-numel // blocksize)
        if self.base == "int4-asym":
            scale_bits = 64 * nblocks  # fp32 min and fp32 step
        elif self.double_quant:
            scale_bits = 8 * nblocks + 32 * -(-nblocks // fmt.NESTED_BLOCKSIZE) + 32
        else:
            scale_bits = 32 * nblocks
        return (self.bits * numel + scale_bits) / numel


def parse_formats(spec: str | list[str]) -> list[Format]:
    """``"nf4,nf4-dq,fp4"`` -> Formats; raises EvalError naming the unknown one and the known ones."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise EvalError("no format given; expected a comma-separated list such as 'nf4,fp4,int4'")
    out = []
    for name in names:
        base, dq = (name[:-3], True) if name.endswith("-dq") else (name, False)
        if base in BNB_FORMATS or base in ("af4", "nf4-search"):
            bits = 4
        elif _NF_RE.fullmatch(base):
            bits = int(base[2])
        elif base == "int4-asym" and not dq:
            bits = 4
        else:
            raise EvalError(
                f"unknown format {name!r}; expected nf4, fp4, int4, nf2..nf8, af4, nf4-search, int4-asym, "
                "each but int4-asym optionally with '-dq'"
            )
        out.append(Format(name, base, bits, dq))
    return out


def parse_blocksizes(spec: str | list[int]) -> list[int]:
    sizes = [int(s) for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    bad = [b for b in sizes if b not in fmt.BLOCKSIZES]
    if not sizes or bad:
        raise EvalError(f"unsupported blocksize(s) {bad or sizes}; expected some of {fmt.BLOCKSIZES}")
    return sizes


_AF4: dict[int, torch.Tensor] = {}


def abnormal_float(blocksize: int, samples: int = 1 << 21, iterations: int = 40) -> torch.Tensor:
    """AF4 levels for ``blocksize`` (Yoshida 2023): 16 ascending fp32 levels with -1, 0, 1 fixed.

    The other 13 minimise the expected L1 error of x / absmax for blocks of standard normals: Lloyd's
    algorithm for L1 (each level the median of its cell, thresholds the midpoints), seeded, started from NF4,
    on normalized samples without each block's own absmax element (it sits exactly on ±1).
    """
    if blocksize not in _AF4:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(samples // blocksize, blocksize, generator=g)
        y = x / x.abs().amax(dim=1, keepdim=True)
        y = y[y.abs() < 1].sort().values  # sorted: each cell is a slice, its median the middle element
        lv = codebook.levels("nf4").double()
        free = torch.tensor([i for i in range(16) if i not in (0, 7, 15)])
        for _ in range(iterations):
            edges = torch.searchsorted(y, ((lv[1:] + lv[:-1]) / 2).float())
            lo = torch.cat([torch.zeros(1, dtype=edges.dtype), edges])
            hi = torch.cat([edges, torch.tensor([y.numel()])])
            mid = ((lo + hi - 1) // 2).clamp(0, y.numel() - 1)
            lv[free] = torch.where(hi[free] > lo[free], y[mid[free]].double(), lv[free])
            lv = lv.sort().values
        _AF4[blocksize] = lv.float()
    return _AF4[blocksize]


def levels_of(f: Format, blocksize: int) -> torch.Tensor:
    """Ascending levels in [-1, 1] of a format (FP4's ±0 and INT4's unused code merged)."""
    if f.base in BNB_FORMATS or f.base == "nf4-search":
        return torch.tensor(sorted(set(codebook.CODEBOOKS[f.base if f.base in BNB_FORMATS else "nf4"])))
    if f.base == "af4":
        return abnormal_float(blocksize)
    if f.base == "int4-asym":
        return torch.linspace(0, 1, 16)
    return codebook.normal_float(f.bits)


# ------------------------------------------------------------------------------------- fake quantization


def _dq_scales(scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Scales after format.py's double quantization (8-bit codes, blocks of 256, mean offset), decoded."""
    q = fmt.QuantizedTensor(
        data=torch.empty(0, 1, dtype=torch.uint8), absmax=scales.float().contiguous(),
        quant_map=codebook.levels("nf4"), quant_type="nf4", blocksize=blocksize,
        shape=torch.Size([scales.numel() * blocksize]), dtype=torch.float32,
    )  # fmt: skip
    return fmt.double_quantize(q).absmax_fp32()


def fake_quantize(w: torch.Tensor, f: Format, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dequantize(quantize(w)) as fp32 like w, the code of each element as an index into ``levels_of``)."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    x = torch.nn.functional.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    lv = levels_of(f, blocksize).to(w.device)
    mids = codebook.midpoints(lv).to(w.device)
    if f.base in BNB_FORMATS:
        q = fmt.quantize(w.detach().float(), f.base, blocksize, f.double_quant)
        out = fmt.dequantize(q, torch.float32)
        codes = torch.bucketize(out.reshape(-1) / _expand(q.absmax_fp32(), blocksize, n), mids)
        return out, codes
    if f.base == "int4-asym":
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        step = (hi - lo) / 15
        c = torch.round((x - lo[:, None]) / torch.where(step > 0, step, 1.0)[:, None]).clamp(0, 15)
        out = (c * step[:, None] + lo[:, None]).reshape(-1)[:n]
        return out.view(w.shape), c.long().reshape(-1)[:n]
    if f.base == "nf4-search":
        codes, scales = fit_scales(x, lv)
    else:
        absmax = x.abs().amax(dim=1)
        codes = torch.bucketize(x / torch.where(absmax > 0, absmax, 1.0)[:, None], mids)
        scales = absmax
    if f.double_quant:
        scales = _dq_scales(scales, blocksize)
    out = (lv[codes] * scales[:, None]).reshape(-1)[:n]
    return out.view(w.shape), codes.reshape(-1)[:n]


def _expand(scales: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    s = scales.repeat_interleave(blocksize)[:n]
    return torch.where(s != 0, s, 1.0)


def entropy_bits(counts: list[int]) -> float:
    """Shannon entropy of a code histogram, in bits (4 is the most a 16-code format can use)."""
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts if c) if total else 0.0


# ---------------------------------------------------------------------------------------------- scoring


def read_text(path: str | os.PathLike | None = None) -> str:
    path = Path(path) if path is not None else DEFAULT_TEXT
    if not path.is_file():
        raise EvalError(f"{path}: no such text file (pass --text FILE)")
    return path.read_text(encoding="utf-8", errors="replace")


def token_windows(tokenizer: Any, text: str, context: int, windows: int) -> torch.Tensor:
    """int64 [windows, context]: the first ``windows`` non-overlapping windows of the text's tokens."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < context:
        raise EvalError(f"the text has {ids.numel()} tokens, fewer than one context window of {context}")
    count = min(windows, ids.numel() // context)
    return ids[: count * context].view(count, context)


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token loss) over every window (each window scored on its own, no carried context)."""
    device = next(model.parameters()).device
    losses = [model(w[None].to(device), labels=w[None].to(device)).loss.float().item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def sentences(text: str, count: int = 64, min_words: int = 6) -> list[str]:
    """The first ``count`` sentences of at least ``min_words`` words, whitespace collapsed."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [s for s in parts if len(s.split()) >= min_words][:count]


@torch.inference_mode()
def embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden states over the attention mask (sentence-transformers' pooling)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


def has_lm_head(model: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    return get is not None and get() is not None


# ------------------------------------------------------------------------------------------------ the lab


def linear_weights(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Parameter]:
    return {n: m.weight for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] not in skip}


def source_note(src: str | os.PathLike | None) -> str | None:
    """What the source's weights were before (GGUF files hold quantized tensors), or None for a float folder."""
    path = checkpoint._resolve(src)
    if path.is_dir():
        return None
    from gguf import GGUFReader

    kinds: dict[str, int] = {}
    for t in GGUFReader(path).tensors:
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    held = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return (
        f"{path.name} holds {held} tensors: the 'float' weights are dequantized GGUF values, not the original "
        "model's. Q4_1 keeps 16 uniform levels between each 32-block's min and max, so int4-asym at blocksize 32 "
        "reproduces those weights exactly and every format is scored against a 4-bit grid."
    )


def evaluate(
    src: str | os.PathLike | None = None,
    formats: str | list[str] = DEFAULT_FORMATS,
    blocksizes: str | list[int] = (64,),
    text: str | os.PathLike | None = None,
    windows: int = 8,
    context: int = 512,
    task: str = "auto",
    device: str | None = None,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Score the float model and every format × blocksize; per layer weight error; code usage.

    Args:
        src: a HF folder or .gguf (None: the embedded SmolLM2-135M-Instruct); or pass ``model`` + ``tokenizer``.
        task: ``"perplexity"`` (needs an LM head), ``"embedding"`` (cosine to float), ``"auto"`` (by the model).
        windows, context: perplexity on up to ``windows`` windows of ``context`` tokens.

    Returns:
        A JSON-ready dict: ``meta``, ``float`` and one entry a run in ``runs``.
    """
    fmts = parse_formats(formats)
    sizes = parse_blocksizes(blocksizes)
    if task not in ("auto", "perplexity", "embedding"):
        raise EvalError(f"unknown task {task!r}; expected auto, perplexity or embedding")
    start = time.perf_counter()
    note = source_note(src) if model is None or src is not None else None
    if model is None:
        model = checkpoint.load_float(src)
        tokenizer = checkpoint.load_tokenizer(src)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.float().to(device).eval()
    if task == "auto":
        task = "perplexity" if has_lm_head(model) else "embedding"
    if task == "perplexity" and not has_lm_head(model):
        raise EvalError(f"{type(model).__name__} has no LM head: perplexity needs a causal LM (use task 'embedding')")
    body = read_text(text)
    meta: dict[str, Any] = {"model": str(src or checkpoint.default_gguf()), "class": type(model).__name__,
                            "task": task, "text": str(text or DEFAULT_TEXT), "source_note": note}  # fmt: skip
    if task == "perplexity":
        ids = token_windows(tokenizer, body, context, windows)
        meta |= {"text_tokens": int(tokenizer(body, return_tensors="pt").input_ids.numel()),
                 "windows": ids.shape[0], "context": context}  # fmt: skip

        def score() -> float:
            return perplexity(model, ids)
    else:
        sents = sentences(body)
        batch = tokenizer(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
        meta |= {"sentences": len(sents)}
        reference: list[torch.Tensor] = []

        def score() -> float:
            e = embed(model, batch)
            if not reference:
                reference.append(e)
            return torch.nn.functional.cosine_similarity(e, reference[0], dim=1).mean().item()

    weights = linear_weights(model)
    if not weights:
        raise EvalError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    originals = {n: p.detach().clone() for n, p in weights.items()}
    numel = sum(w.numel() for w in originals.values())
    meta |= {"layers": list(weights), "quantized_params": numel}
    base = score()
    runs = []
    for f in fmts:
        for bs in sizes:
            counts = torch.zeros(len(levels_of(f, bs)), dtype=torch.int64)
            layers, err_total, w2_total, bits = [], 0.0, 0.0, 0.0
            for name, p in weights.items():
                w = originals[name]
                out, codes = fake_quantize(w, f, bs)
                err = (out - w.float()).square().sum().item()
                w2 = w.float().square().sum().item()
                layers.append({"name": name, "mse": err / w.numel(), "rel_mse": err / max(w2, 1e-30),
                               "sqnr_db": 10 * math.log10(w2 / err) if err > 0 else math.inf})  # fmt: skip
                err_total, w2_total = err_total + err, w2_total + w2
                bits += f.bits_per_param(w.numel(), bs) * w.numel()
                counts += torch.bincount(codes.long().cpu(), minlength=counts.numel())
                p.data.copy_(out.to(p.dtype))
            value = score()
            for name, p in weights.items():
                p.data.copy_(originals[name])
            hist = counts.tolist()
            runs.append({"format": f.name, "blocksize": bs, "bits_per_param": bits / numel,
                         "score": value, "delta": value - base if task == "perplexity" else 1 - value,
                         "mse": err_total / numel, "rel_mse": err_total / w2_total,
                         "sqnr_db": 10 * math.log10(w2_total / err_total) if err_total > 0 else math.inf,
                         "code_counts": hist, "entropy_bits": entropy_bits(hist), "layers": layers})  # fmt: skip
    meta["seconds"] = round(time.perf_counter() - start, 1)
    return {"meta": meta, "float": base, "runs": runs}


# ------------------------------------------------------------------------------------------------ output


def format_table(result: dict[str, Any]) -> str:
    """The terminal table: one row a run, float first."""
    meta = result["meta"]
    ppl = meta["task"] == "perplexity"
    lines = [f"model: {meta['model']} ({meta['class']}), {len(meta['layers'])} Linear layers quantized "
             f"({meta['quantized_params']:,} params; lm_head and embeddings kept)"]  # fmt: skip
    if meta.get("source_note"):
        lines.append(f"note: {meta['source_note']}")
    if ppl:
        lines.append(f"text: {meta['text']}: {meta['text_tokens']:,} tokens; scored {meta['windows']} windows "
                     f"of {meta['context']} tokens")  # fmt: skip
        head = f"{'format':<15} {'block':>5} {'bits/param':>10} {'ppl':>8} {'Δppl':>7}"
    else:
        lines.append(f"text: {meta['text']}: {meta['sentences']} sentences, mean-pooled embeddings")
        head = f"{'format':<15} {'block':>5} {'bits/param':>10} {'cos':>8} {'1-cos':>9}"
    lines.append(f"{head} {'rel MSE':>9} {'SQNR dB':>8} {'entropy':>7}")
    if ppl:
        lines.append(f"{'float':<15} {'':>5} {32:>10.3f} {result['float']:>8.2f} {0:>7.2f}")
    for r in result["runs"]:
        score = f"{r['score']:>8.2f} {r['delta']:>7.2f}" if ppl else f"{r['score']:>8.5f} {r['delta']:>9.2e}"
        lines.append(f"{r['format']:<15} {r['blocksize']:>5} {r['bits_per_param']:>10.3f} {score} "
                     f"{r['rel_mse']:>9.5f} {r['sqnr_db']:>8.2f} {r['entropy_bits']:>7.3f}")  # fmt: skip
    lines.append(f"[{meta['seconds']} s]")
    return "\n".join(lines)


def write_plots(
    result: dict[str, Any], folder: str | os.PathLike, layer: str | None = None, weight: torch.Tensor | None = None
) -> list[Path]:
    """PNG plots: Δscore vs bits/param, SQNR per layer, and one layer's weights with the code levels over them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta, runs = result["meta"], result["runs"]
    ppl = meta["task"] == "perplexity"
    written = []

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for name in dict.fromkeys(r["format"] for r in runs):
        rs = sorted((r for r in runs if r["format"] == name), key=lambda r: r["bits_per_param"])
        ax.plot([r["bits_per_param"] for r in rs], [max(r["delta"], 1e-6) for r in rs], "o-", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("bits / param (scales included)")
    ax.set_ylabel("Δ perplexity vs float" if ppl else "1 − cosine to float")
    ax.set_title(Path(meta["model"]).name, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(folder / "delta_vs_bits.png")
    fig.savefig(written[-1])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=80)
    size = 64 if any(r["blocksize"] == 64 for r in runs) else runs[0]["blocksize"]
    for r in (r for r in runs if r["blocksize"] == size):
        ax.plot([x["sqnr_db"] for x in r["layers"]], label=r["format"], lw=1)
    ax.set_xlabel("Linear layer (model order)")
    ax.set_ylabel(f"SQNR dB (block {size})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    written.append(folder / "sqnr_per_layer.png")
    fig.savefig(written[-1])
    plt.close(fig)

    if weight is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=80)
        x = torch.nn.functional.pad(weight.detach().float().reshape(-1), (0, -weight.numel() % 64)).view(-1, 64)
        y = (x / x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)).reshape(-1)
        ax.hist(y.cpu().numpy(), bins=200, color="0.6")
        top = ax.get_ylim()[1]
        styles = {"nf4": ("C0", 1.0), "fp4": ("C1", 0.75), "int4": ("C2", 0.5), "af4": ("C3", 0.25)}
        for name, (color, h) in styles.items():
            lv = levels_of(parse_formats(name)[0], 64)
            ax.vlines(lv.numpy(), 0, top * h, colors=color, lw=1, label=name)
        ax.set_xlabel("w / block absmax (block 64)")
        ax.set_title(f"{layer}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(folder / "weight_histogram.png")
        fig.savefig(written[-1])
        plt.close(fig)
    return written


# ----------------------------------------------------------------------------------------------- the CLI


def add_arguments(p: Any) -> None:
    """The ``nf4 eval`` options (cli.py owns the parser)."""
    p.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma-separated (default {DEFAULT_FORMATS})")
    p.add_argument("--blocksizes", default="64", help="comma-separated, e.g. 32,64,128,256 (default 64)")
    p.add_argument("--text", default=None, help=f"text file to score (default {DEFAULT_TEXT})")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8)")
    p.add_argument("--context", type=int, default=512, help="tokens a window (default 512)")
    p.add_argument("--task", choices=("auto", "perplexity", "embedding"), default="auto")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="OUT",
        help="write the full results as JSON to OUT ('--json' alone: print JSON instead of the table)",
    )
    p.add_argument("--plots", default=None, metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--layer", default=None, help="layer for the weight histogram (default: the first)")


def run_cli(args: Any) -> dict[str, Any]:
    """``nf4 eval``: returns the result; a ``--json OUT`` file is written here and the table printed."""
    parse_formats(args.formats), parse_blocksizes(args.blocksizes), read_text(args.text)  # fail before loading
    model, tokenizer = checkpoint.load_float(args.model), checkpoint.load_tokenizer(args.model)
    layers = list(linear_weights(model))
    layer = args.layer or (layers[0] if layers else None)
    if args.plots and layer not in layers:
        raise EvalError(f"--layer {layer!r} is not a quantized Linear layer; e.g. {layers[:1]}")
    result = evaluate(args.model, args.formats, args.blocksizes, args.text, args.windows, args.context, args.task,
                      args.device, model, tokenizer)  # fmt: skip
    if args.plots:
        weight = model.get_submodule(layer).weight  # the float weight: evaluate puts it back after each run
        result["meta"]["plots"] = [str(p) for p in write_plots(result, args.plots, layer, weight)]
    if args.json not in (None, "-"):
        Path(args.json).write_text(json.dumps(result, indent=1))
        args.json = None  # the file holds the JSON; the terminal gets the table
    return result
