"""nf4.decode's static-cache loop on the CPU (its compiled, CUDA-graphed form: tests/gpu/test_cli_gpu.py): the same
greedy tokens as transformers' generate on SmolLM2, end-of-text, a reused cache, sampling, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="nf4.decode needs the 'hf' extra (transformers)")
from nf4 import checkpoint, nn  # noqa: E402
from nf4.decode import CHECK_EVERY, Decoder  # noqa: E402
from test_checkpoint import quantize_smollm_once  # noqa: E402  (same session cache as test_checkpoint)

NEW = CHECK_EVERY + 8  # an end-of-text check inside the run and one at its end


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """SmolLM2 (NF4), a chat prompt's ids and transformers' greedy continuation of NEW tokens."""
    folder: Path = quantize_smollm_once(tmp_path_factory)[0]
    model = checkpoint.from_pretrained(folder).eval()
    tokenizer = checkpoint.load_tokenizer(folder)
    messages = [{"role": "user", "content": "List three rivers of Europe."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    return model, ids, want


def test_greedy_equals_transformers_generate_and_the_cache_is_reused(smollm) -> None:
    model, ids, want = smollm
    decoder = Decoder(model, ids.shape[1] + NEW)
    assert torch.equal(decoder.generate(ids, NEW), want)
    assert torch.equal(decoder.generate(ids, 4), want[:, : ids.shape[1] + 4])  # the cache reset in place
    assert torch.equal(decoder.generate(ids, NEW, stop_after=3), want[:, : ids.shape[1] + 3])
    assert torch.equal(decoder.generate(ids, 1), want[:, : ids.shape[1] + 1])  # the prefill's token alone


def test_greedy_equals_transformers_generate_on_a_fused_model(smollm, tmp_path_factory) -> None:
    # FusedPart modules (q/k/v and gate/up as one matmul each) under the static cache: same tokens as generate's
    _, ids, _ = smollm
    model = checkpoint.from_pretrained(quantize_smollm_once(tmp_path_factory)[0]).eval()
    assert nn.fuse_projections(model) == 60
    with torch.inference_mode():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(Decoder(model, ids.shape[1] + 12).generate(ids, 12), want)


@pytest.mark.parametrize("at", [2, CHECK_EVERY + 3])
def test_ends_after_the_first_end_of_text_token(smollm, at: int) -> None:
    model, ids, want = smollm
    prompt = ids.shape[1]
    eos = int(want[0, prompt + at])  # pretend the token made at step `at` ends the text
    first = int((want[0, prompt:] == eos).nonzero()[0, 0])  # (or an earlier step that made the same token)
    got = Decoder(model, prompt + NEW).generate(ids, NEW, eos_token_ids=[eos, 10**9])
    assert torch.equal(got, want[:, : prompt + first + 1])


def test_sampling_draws_from_the_top_p_mass(smollm) -> None:
    model, ids, _ = smollm
    decoder = Decoder(model, ids.shape[1] + 8)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(decoder.generate(ids, 8, temperature=0.8, top_p=0.9))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (1, ids.shape[1] + 8)
    assert int(runs[0].max()) < model.config.vocab_size
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])  # probabilities ~0.72, 0.27, ...: top-p 0.5 keeps only token 1
    assert {int(Decoder._choose(logits, 1.0, 0.5)) for _ in range(20)} == {1}


def test_refuses_a_batch_and_too_long_a_run(smollm) -> None:
    model, ids, _ = smollm
    decoder = Decoder(model, ids.shape[1] + 4)
    with pytest.raises(ValueError, match="one sequence at a time, got a batch of 2"):
        decoder.generate(ids.repeat(2, 1), 4)
    with pytest.raises(ValueError, match=f"{ids.shape[1]} prompt \\+ 5 new tokens exceed the cache's"):
        decoder.generate(ids, 5)
