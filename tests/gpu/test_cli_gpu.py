"""`nf4 generate` on a GPU (skipped without CUDA): the default device, the compiled CUDA-graphed decode, fusing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

import nf4
from nf4 import ops
from nf4.cli import main
from nf4.decode import Decoder

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
    assert result["device"] == "cuda:0"
    assert result["new_tokens"] == 12 and result["tokens_per_s"] > 0
    assert all(0 <= int(word[1:]) < VOCAB for word in result["text"].split())
    assert (result["compile_s"] is not None and result["compile_s"] > 0) == ("--compile" in extra)
    assert result["fused_groups"] == (4 if "--fuse" in extra else 0)  # q/k/v and gate/up in each of 2 layers


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_decode_chooses_the_argmax_of_an_eager_forward(llama_folder: Path, compiled: bool, fuse: bool) -> None:
    # teacher forcing: each greedy token of the static-cache loop (compiled: CUDA graphs of the one-token step) is
    # an argmax of one eager forward over the whole sequence, up to bf16 noise (a broken cache, position or graph
    # replay would pick tokens ~2 standard deviations of the logits below the top)
    model = nf4.from_pretrained(llama_folder, dtype=torch.bfloat16).cuda()
    if fuse:
        nf4.fuse_projections(model)
    ids = torch.tensor([[1, 2, 3, 4, 5]], device="cuda")
    decoder = Decoder(model, 5 + 24, compiled=compiled)
    tokens = decoder.generate(ids, 24)
    assert torch.equal(decoder.generate(ids, 24), tokens)  # the second run replays (compiled) what the first made
    with torch.inference_mode():
        logits = model(tokens[:, :-1]).logits[0, 4:].float()  # the logits that chose tokens 5..28
    chosen = logits.gather(1, tokens[0, 5:, None])[:, 0]
    gap = (logits.max(dim=1).values - chosen) / logits.std(dim=1)
    assert tokens.shape == (1, 29) and gap.max() < 0.05, gap
