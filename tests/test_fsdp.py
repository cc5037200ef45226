"""FSDP2: 4-bit weights sharded by rows and all-gathered bit-exactly; `nf4 finetune --fsdp` against one process.

Distributed tests run 2 CPU processes on gloo under torchrun (``--standalone``: a free port), on tiny shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nf4 import fsdp
from nf4.cli import main
from nf4.format import quantize

transformers = pytest.importorskip("transformers", reason="fine-tuning needs the 'hf' extra (transformers)")
tokenizers = pytest.importorskip("tokenizers")

GPL3 = Path("/usr/share/common-licenses/GPL-3")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "2", "--grad-accum", "2", "--seq-len", "32", "--r", "4", "--save-every", "2"]
TINY += ["--lr", "1e-3", "--seed", "5", "--lora-dropout", "0", "--json"]


def _torchrun(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    # "--" ends torchrun's options: its parser would take "--r 4" for one of its own.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _json_line(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))


# ------------------------------------------------------------------------------------------------ layout


def test_rows_must_hold_whole_blocks() -> None:
    q = quantize(torch.randn(4, 96), blocksize=64)
    with pytest.raises(fsdp.ShardingError, match="in_features 96 is not a multiple of blocksize 64"):
        fsdp.to_param(q, world_size=2, name="mlp.down_proj")


@pytest.mark.parametrize(
    ("shape", "world", "keeps"),
    [
        ((2048, 2048), 2, True),  # the 1.1B Llama: q/o, k/v, gate/up, down on 2 and 8 ranks
        ((256, 2048), 8, True),
        ((5632, 2048), 2, True),
        ((2048, 5632), 8, True),
        ((33, 64), 2, False),  # 17 rows x 1 absmax: a nested block would straddle the ranks
        ((3, 16384), 2, True),  # 2 rows x 256 absmax a rank, padded
    ],
)
def test_double_quant_kept_when_nested_blocks_align(shape: tuple[int, int], world: int, keeps: bool) -> None:
    assert fsdp.keeps_double_quant(*shape, 64, world) is keeps


def test_to_param_keeps_the_values() -> None:
    q = quantize(torch.randn(33, 64))
    p = fsdp.to_param(q, world_size=2)  # misaligned: absmax decoded to fp32
    assert p.nested_absmax is None and p.absmax.dtype == torch.float32
    back = p.quantized()
    assert torch.equal(back.data, q.data) and torch.equal(back.absmax, q.absmax_fp32())
    assert torch.equal(back.dequantize(), q.dequantize())


def test_fsdp_needs_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(fsdp.ShardingError, match="needs torchrun"):
        fsdp.init_distributed()


# ------------------------------------------------------------------------------------------ all-gather

GATHER = """
import json, sys, torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from nf4 import fsdp
from nf4.nn import LinearNF4

rank, world, dev = fsdp.init_distributed(60)
torch.manual_seed(0)  # the same layers on every rank
shapes = [(128, 64), (33, 64), (3, 16384), (256, 128), (64, 128)]
model = nn.Sequential(*[LinearNF4.from_linear(nn.Linear(i, o)) for o, i in shapes]).to(dev)
# bitsandbytes #1945: bytes that spell non-canonical bf16 NaNs (0x7FC1, 0xFFC1 little-endian) must survive
nan = model[4].weight
nan.view(-1, 2)[:, 0], nan.view(-1, 2)[:, 1] = 0xC1, torch.tensor([0x7F, 0xFF]).repeat(nan.shape[0] // 4)
originals = [m.qweight for m in model]
x = [torch.randn(3, m.in_features, generator=torch.Generator().manual_seed(i)).to(dev) for i, m in enumerate(model)]
reference = [m(xi) for m, xi in zip(model, x)]
fsdp.shard_linears(model, world)
for m in model:
    fully_shard(m, mesh=init_device_mesh(dev.type, (world,)))
report = []
for i, (m, q) in enumerate(zip(model, originals)):
    local = fsdp.local_tensor(m.weight)
    m.unshard()
    g = m.weight.quantized()
    y = m(x[i])
    report.append({
        "shape": list(q.shape), "local_rows": local.rows, "dq": g.double_quant,
        "data": torch.equal(g.data, q.data), "absmax_fp32": torch.equal(g.absmax_fp32(), q.absmax_fp32()),
        "codes": g.double_quant and torch.equal(g.absmax, q.absmax) and torch.equal(g.nested_absmax, q.nested_absmax),
        "nan_bf16": int(g.data.view(-1).view(torch.bfloat16).isnan().sum()),
        "forward": torch.equal(y, reference[i]),
    })
    m.reshard()
with open(sys.argv[1] + f".{rank}", "w") as f:
    json.dump(report, f)
fsdp.exit_worker()
"""


def test_all_gather_returns_the_original_bytes(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    run = _torchrun([str(script), str(tmp_path / "report")])
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report.{rank}").read_text())
        by_shape = {tuple(r["shape"]): r for r in report}
        assert all(r["data"] and r["absmax_fp32"] and r["forward"] for r in report), report
        assert by_shape[(33, 64)]["local_rows"] == (17 if rank == 0 else 16)  # padded by FSDP2
        assert not by_shape[(33, 64)]["dq"]  # nested blocks would straddle: fp32 absmax
        assert by_shape[(3, 16384)]["dq"] and by_shape[(3, 16384)]["codes"]  # 8-bit codes gathered as they are
        assert by_shape[(256, 128)]["codes"]
        assert by_shape[(64, 128)]["nan_bf16"] == 64 * 128 // 4  # every bf16 view of the bytes is a NaN...
        assert by_shape[(64, 128)]["data"]  # ...and the bytes came back unchanged


# ------------------------------------------------------------------------------------------------ finetune


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer, as an HF folder, and JSONL text."""
    if not GPL3.is_file():
        pytest.skip(f"needs {GPL3} (Debian's license texts)")
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train([str(GPL3)], tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    text = GPL3.read_text()
    data = folder.parent / "gpl.jsonl"
    data.write_text("".join(json.dumps({"text": text[i : i + 500]}) + "\n" for i in range(0, 20000, 500)))
    return folder, data


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_fsdp_finetune_matches_one_process_and_resumes(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model, data = tiny
    assert main(["finetune", str(model), str(data), "--out", str(tmp_path / "one"), "--steps", "4", *TINY]) == 0
    one = _json_line(capsys.readouterr().out)
    # The resumed half reads the model as nf4 quantize wrote it (the same bytes): both loaders, rows from each.
    assert main(["quantize", str(model), str(tmp_path / "nf4"), "--json"]) == 0
    capsys.readouterr()
    cli = ["-m", "nf4.cli", "--", "finetune", "MODEL", str(data), "--out", str(tmp_path / "two"), *TINY, "--fsdp"]
    first = _torchrun(cli[:4] + [str(model)] + cli[5:] + ["--steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(cli[:4] + [str(tmp_path / "nf4")] + cli[5:] + ["--steps", "4", "--resume"])  # DCP + RNG
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sum(line.startswith("{") for line in resumed.stdout.splitlines()) == 1  # the job's result, once
    two = _json_line(resumed.stdout)
    # the same global batch split over 2 ranks: the same losses up to float summation order
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys() and all(k.startswith("base_model.model.model.layers.") for k in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    ckpt = tmp_path / "two" / "checkpoint-4"
    assert (ckpt / "distributed" / ".metadata").is_file() and (ckpt / "rng-1.safetensors").is_file()
    # each rank holds half of the 4-bit base (every dim of this model splits evenly)
    for row in two["memory"]:
        assert row["base_bytes"] * 2 == row["whole_base_bytes"]


# ------------------------------------------------------------------------------------------------- exit

EXIT = """
import sys
from nf4 import fsdp

rank, world, _ = fsdp.init_distributed(60)
print(f"rank {rank} done", end="")  # no newline, stdout a pipe: still buffered when the worker leaves
fsdp.exit_worker(int(sys.argv[1]) if rank == 1 else 0)
"""


@pytest.mark.parametrize("code", [0, 5])
def test_exit_worker_flushes_and_keeps_the_status(tmp_path: Path, code: int) -> None:
    script = tmp_path / "exit.py"
    script.write_text(EXIT)
    run = _torchrun([str(script), str(code)])
    assert "rank 0 done" in run.stdout and "rank 1 done" in run.stdout
    if code == 0:
        assert run.returncode == 0, run.stderr[-3000:]
    else:
        assert run.returncode != 0 and f"exitcode  : {code}" in run.stderr


def test_cli_fsdp_outside_torchrun_returns_an_error(
    tiny: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Not a torchrun worker: ``main`` reports and returns (it leaves by exit_worker only inside a job)."""
    for var in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    model, data = tiny
    assert main(["finetune", str(model), str(data), "--out", str(tmp_path / "x"), *TINY, "--fsdp"]) == 1
    assert "needs torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- failure

CRASH = """
import os, sys, time, torch
import torch.distributed as dist
from nf4 import fsdp

rank, world, _ = fsdp.init_distributed(float(sys.argv[2]))
dist.barrier()
if rank == 1:
    if sys.argv[1] == "crash":
        os._exit(3)
    time.sleep(120)  # hang: never joins the next collective
dist.all_reduce(torch.ones(1))
"""


def test_a_crashed_rank_stops_the_job(tmp_path: Path) -> None:
    """torchrun sees rank 1 exit and stops rank 0, which waits in a collective."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    start = time.monotonic()
    run = _torchrun([str(script), "crash", "600"], timeout=120)
    assert run.returncode != 0 and "exitcode  : 3" in run.stderr
    assert time.monotonic() - start < 60


def test_a_hung_rank_times_out(tmp_path: Path) -> None:
    """Without torchrun watching, the process group's timeout ends the wait of the healthy rank."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    env |= {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), "hang", "2"],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode != 0 and "imed out" in err, err[-2000:]
        assert time.monotonic() - start < 60
    finally:
        procs[1].kill()
        procs[1].wait()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
