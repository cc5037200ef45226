"""`nf4 generate` on a GPU (skipped without CUDA): the default device, the compiled CUDA-graphed decode, fusing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

from nf4 import ops
from nf4.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not ops.HAS_TRITON, reason="needs CUDA and Triton")

VOCAB = 512


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama (hidden 1024, random weights, no end-of-text token) with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("llama")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    words.decoder = tokenizers.decoders.WordPiece(prefix="##")
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", pad_token="w0").save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _generate(capsys: pytest.CaptureFixture, folder: Path, *extra: str) -> dict:
    code = main(["generate", str(folder), "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "12", "--json", *extra])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


@pytest.mark.parametrize("extra", [(), ("--compile",), ("--fuse", "--compile"), ("--device", "cuda:0")])
def test_generate_runs_on_the_gpu(capsys: pytest.CaptureFixture, llama_folder: Path, extra: tuple) -> None:
    # --device auto picks the GPU; --compile pays its compile and graph capture in a warm-up timed apart, then
    # generates all the tokens asked for (no end-of-text token here) through the captured decode step
    result = _generate(capsys, llama_folder, *extra)
    assert result["device"] == ("cuda:0" if "cuda:0" in extra else "cuda")
    assert result["new_tokens"] == 12 and result["tokens_per_s"] > 0
    assert all(0 <= int(word[1:]) < VOCAB for word in result["text"].split())
    assert (result["compile_s"] is not None and result["compile_s"] > 0) == ("--compile" in extra)
    assert result["fused_groups"] == (4 if "--fuse" in extra else 0)  # q/k/v and gate/up in each of 2 layers
