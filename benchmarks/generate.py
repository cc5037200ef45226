"""`nf4 generate` on a GPU: tokens/s of one Llama-shaped model (random weights) as bf16, NF4 (nf4, plain and with
fused projections) and bitsandbytes NF4, eager and with the compiled, CUDA-graphed decode step (`--compile`).

Usage: python benchmarks/generate.py [--layers 32] [--tokens 128] [--variants bf16,nf4,nf4-fused,bnb] [--out DIR]

Every variant runs through ``nf4.cli.generate`` (what ``nf4 generate`` runs), greedy, on the same weights, in one
process; eager runs after a 4-token warm-up (kernel builds), compiled ones after generate's own (compile_s). The
model is Llama-3-8B's shape (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary 128256) with random weights,
so the tokens mean nothing; the vocabulary is a word-level tokenizer of 128256 made-up words, so that the lm_head
(kept in bf16, as nf4 and bitsandbytes both do by default) costs what it costs an 8B model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import tokenizers
import torch
import transformers

import nf4
from nf4.cli import generate

VOCAB = 128256


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Words w0 .. w128255, split on spaces: any token id decodes."""
    model = tokenizers.models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


def llama(layers: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
        tie_word_embeddings=False, eos_token_id=None, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def to_bnb(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' NF4 + double quant (its Linear4bit, bf16 compute) in place of every Linear but the lm_head."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{parent_name}.{name}" != ".lm_head" and name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).cuda()
                setattr(parent, name, layer)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens a generation")
    parser.add_argument("--variants", default="bf16,nf4,nf4-fused,bnb")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--out", help="folder for generate.jsonl")
    args = parser.parse_args()
    tok = word_tokenizer()
    prompt = " ".join(f"w{i}" for i in range(1, 33))  # 32 prompt tokens
    base = llama(args.layers)
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                      "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}), flush=True)  # fmt: skip
    for variant in args.variants.split(","):
        if variant == "bf16":
            model = base
        elif variant.startswith("nf4"):
            model = nf4.quantize_model(copy.deepcopy(base))
            if variant == "nf4-fused":
                nf4.fuse_projections(model)
        elif variant == "bnb":
            model = to_bnb(copy.deepcopy(base))
        else:
            raise SystemExit(f"unknown variant {variant}")
        for mode in args.modes.split(","):
            torch.compiler.reset()
            record = {"variant": variant, "mode": mode, "memory_gb": round(torch.cuda.memory_allocated() / 1e9, 2)}
            try:
                if mode == "eager":  # Triton's kernels built and cuBLAS's chosen before the timed run
                    generate(model, tok, prompt, 4)
                result = generate(model, tok, prompt, args.tokens, compiled=mode == "compiled")
                record |= {k: result[k] for k in ("new_tokens", "seconds", "tokens_per_s", "compile_s")}
                record["first_tokens"] = result["text"].split()[:8]
            except Exception as e:  # noqa: BLE001  (a variant that cannot compile is a result too)
                record["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            print(json.dumps(record), flush=True)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, "generate.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
        if model is not base:
            del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
