"""`nf4 finetune` / `nf4 merge` / `nf4 generate --adapter`: exact resume after SIGKILL, PEFT-format output, bad input.

Fast tests use a tiny random Llama saved as a Hugging Face folder with a 300-token BPE tokenizer trained on
GPL-3 here (seconds, no download); one test trains the embedded SmolLM2-135M for a few steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nf4 import lora, train
from nf4.cli import main

transformers = pytest.importorskip("transformers", reason="fine-tuning needs the 'hf' extra (transformers)")
tokenizers = pytest.importorskip("tokenizers")

GPL3 = Path("/usr/share/common-licenses/GPL-3")
REPO = Path(__file__).resolve().parents[1]
# A few steps, tiny shapes: the resume test runs three processes of this.
TINY = [
    "--steps",
    "8",
    "--batch-size",
    "2",
    "--grad-accum",
    "2",
    "--seq-len",
    "32",
    "--r",
    "4",
    "--save-every",
    "2",
    "--lr",
    "1e-3",
    "--seed",
    "5",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 32) with a BPE tokenizer, as an HF folder (float safetensors)."""
    if not GPL3.is_file():
        pytest.skip(f"needs {GPL3} (Debian's license texts)")
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    bpe.train([str(GPL3)], trainer)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", unk_token="<unk>")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gpl.jsonl"
    paragraphs = [p for p in GPL3.read_text().split("\n\n") if p.strip()][:60]
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    return path


def _cli(*argv: str) -> int:
    return main(list(argv))


def _child(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sigkill_and_resume_ends_with_the_same_adapter_bytes(tiny_model: Path, text_data: Path, tmp_path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _cli("finetune", str(tiny_model), str(text_data), "--out", str(ref), "--json", *TINY) == 0
    # The child kills itself with SIGKILL half-way through writing checkpoint-6 (steps 5 and 6 are lost).
    proc = _child(
        f"""
        import os, signal
        from nf4 import lora
        from nf4.cli import main
        rename = lora.replace_dir
        def replace_dir(new, out):
            if out.name == "checkpoint-6":
                os.kill(os.getpid(), signal.SIGKILL)
            rename(new, out)
        lora.replace_dir = replace_dir
        main(["finetune", {str(tiny_model)!r}, {str(text_data)!r}, "--out", {str(killed)!r}, "--json", *{TINY!r}])
    """,
        tmp_path,
    )
    assert proc.returncode == -9, proc.stderr
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list(killed.glob(".checkpoint-6.*.tmp")), "the half-written checkpoint is left in its temporary folder"
    assert not (killed / lora.ADAPTER_WEIGHTS).exists()
    proc = _child(
        f"""
        from nf4.cli import main
        raise SystemExit(main(["finetune", {str(tiny_model)!r}, {str(text_data)!r}, "--out", {str(killed)!r},
                               "--json", "--resume", *{TINY!r}]))
    """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (killed / lora.ADAPTER_WEIGHTS).read_bytes() == (ref / lora.ADAPTER_WEIGHTS).read_bytes()
    assert not list(killed.glob(".checkpoint-*.tmp"))
    a, b = (json.loads((d / train.STATE_FILE).read_text())["log_history"] for d in (ref, killed))
    assert [e["loss"] for e in a] == [e["loss"] for e in b] and [e["step"] for e in a] == list(range(1, 9))
    state = json.loads((ref / train.STATE_FILE).read_text())
    assert state["global_step"] == 8 and state["max_steps"] == 8
    assert set(a[0]) >= {"epoch", "grad_norm", "learning_rate", "loss", "step"}
    assert a[0]["learning_rate"] == 0.0 and a[1]["learning_rate"] == 1e-3  # warmup ceil(3% of 8) = 1 step, as HF
    assert sorted(p.name for p in ref.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


def test_cli_adapter_merge_and_generate(tiny_model: Path, text_data: Path, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["--steps", "4", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1", "--r", "4", "--lr", "1e-2"]
    assert (
        _cli(
            "finetune",
            str(tiny_model),
            str(text_data),
            "--out",
            str(out),
            "--json",
            "--eval-every",
            "2",
            "--no-gradient-checkpointing",
            *argv,
        )
        == 0
    )
    log = json.loads((out / train.STATE_FILE).read_text())["log_history"]
    assert [e["step"] for e in log if "eval_loss" in e] == [0, 2, 4]
    # merge (bf16 float folder) equals base + adapter within bf16 rounding; --requantize warns and loads as NF4.
    assert _cli("merge", str(tiny_model), str(out), str(tmp_path / "merged"), "--dtype", "fp32", "--json") == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    model, _ = train.load_model(tiny_model)
    lora.load_adapter(model, out)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=1e-4)
    with pytest.warns(UserWarning, match="rounds"):
        assert _cli("merge", str(tiny_model), str(out), str(tmp_path / "requant"), "--requantize", "--json") == 0
    from nf4 import checkpoint

    requant = checkpoint.from_pretrained(tmp_path / "requant")
    with torch.no_grad():
        assert (requant(ids).logits - want).abs().max() < 1.0  # rounded again: close, not equal
    assert _cli("merge", str(tiny_model), str(out), str(tmp_path / "merged"), "--json") == 1  # OUT exists
    assert (
        _cli(
            "generate", str(tiny_model), "--prompt", "The GNU", "--adapter", str(out), "--max-new-tokens", "4", "--json"
        )
        == 0
    )


def test_prompt_response_masks_the_prompt(tiny_model: Path, tmp_path) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Is it free?", "response": " Yes, it is free software."}) + "\n")
    (ex,) = train.load_examples([data], tok, 64)
    n_prompt = len(tok("Is it free?", add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [train.IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.input_ids[-1] == tok.eos_token_id


def test_bad_input_gives_clear_errors(tiny_model: Path, text_data: Path, tmp_path, capsys) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": 3}\n{"text": "ok"}\n{not json\n')
    with pytest.raises(train.TrainingError, match=r"bad.jsonl:3: expected an object with a string \"text\""):
        train.load_examples([bad], tok, 32)
    with pytest.warns(UserWarning, match="skipped 2 malformed line"):
        assert len(train.read_records([bad], skip_bad_lines=True)) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(train.TrainingError, match="no training examples"):
        train.load_examples([empty], tok, 32)

    def fails(*argv: str, match: str) -> None:
        assert _cli("finetune", str(tiny_model), *argv) == 1
        assert match in capsys.readouterr().err

    fails(str(bad), "--out", str(tmp_path / "o1"), match="bad.jsonl:3:")
    fails(str(text_data), "--out", str(tmp_path / "o2"), "--seq-len", "128", match="above the model's maximum of 64")
    (tmp_path / "file").write_text("x")
    fails(str(text_data), "--out", str(tmp_path / "file" / "out"), match="cannot write the output folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    fails(str(text_data), "--out", str(tmp_path / "full"), match="not empty; pass --resume")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    fails(str(text_data), "--out", str(tmp_path / "o3"), "--resume", match="no checkpoint-<step> folder")
    fails(str(text_data), "--out", str(tmp_path / "o4"), "--steps", "0", match="--steps must be >= 1")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model: Path, text_data: Path, tmp_path) -> None:
    model, tok = train.load_model(tiny_model)
    examples = train.load_examples([text_data], tok, 32)
    args = train.TrainArgs(
        steps=6, batch_size=2, grad_accum=1, seq_len=32, r=4, save_every=2, gradient_checkpointing=False
    )

    def poison(step: int, entry: dict) -> None:
        if step == 3:
            with torch.no_grad():
                lora.lora_parameters(model)[0].fill_(math.nan)

    with pytest.raises(train.TrainingError, match=r"step 4: loss is nan; training stopped \(the last good checkpoint"):
        train.train(model, tok, examples, tmp_path / "out", args, callback=poison)
    good = tmp_path / "out" / "checkpoint-2"
    assert [p.name for p in train.checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert torch.isfinite(
        lora.read_adapter_weights(good)["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    ).all()


def test_smollm2_a_few_steps_lower_the_loss(tmp_path) -> None:
    """The embedded SmolLM2-135M-Instruct (NF4), r 8, 4 steps on license text: a fixed training batch's loss falls."""
    from nf4 import checkpoint

    try:
        checkpoint.default_gguf()
    except checkpoint.CheckpointError as e:
        pytest.skip(str(e))
    model, tok = train.load_model(None)
    examples = train.load_examples([GPL3], tok, 48)
    fixed = train.collate(examples[:2], tok.eos_token_id, torch.device("cpu"))
    args = train.TrainArgs(
        steps=4,
        batch_size=2,
        grad_accum=1,
        seq_len=48,
        r=8,
        lr=2e-3,
        warmup_ratio=0.0,
        save_every=0,
        gradient_checkpointing=False,
        lora_dropout=0.0,
    )
    torch.manual_seed(args.seed)
    lora.add_lora(model, args.lora_config())  # B = 0: the base's loss; train() keeps these adapters
    with torch.no_grad():
        loss, n = train.loss_sum(model, fixed)
    before = loss.item() / n
    state = train.train(model, tok, examples[:8], tmp_path / "out", args)
    model.eval()
    with torch.no_grad():
        loss, n = train.loss_sum(model, fixed)
    after = loss.item() / n
    assert after < before - 0.1, (before, after)
    assert len(state["log_history"]) == 4


def test_compile_flag_trains_compiled_layers_like_eager(tiny_model: Path, text_data: Path, tmp_path) -> None:
    """`nf4 finetune --compile`: the decoder layers run compiled (nf4.fused "compile") and train as eager does."""
    losses = {}
    for compiled in (False, True):
        model, tok = train.load_model(tiny_model)
        examples = train.load_examples([text_data], tok, 32)
        args = train.TrainArgs(steps=2, batch_size=2, grad_accum=1, seq_len=32, r=4, save_every=2, compile=compiled)
        state = train.train(model, tok, examples, tmp_path / f"out-{compiled}", args)
        assert ("compile" in model.nf4_fused) == compiled
        losses[compiled] = [e["loss"] for e in state["log_history"] if "loss" in e]
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
