"""Token-by-token generation with a static KV cache and, on a GPU, a compiled, CUDA-graphed decode step.

``transformers``' ``generate`` with a static cache compiles the step too, but between steps it runs its logits
processors, stopping criteria and a host sync per token: on an H200 an 8B-shaped Llama then made 122-133 tokens/s
as bf16, NF4 (ours) and bitsandbytes alike, ~7.5 ms a token whatever the weights. Here a step is the
model's forward and the next token's choice on the device; the host only launches (the graph replay, the choice)
and looks at the tokens for an end-of-text every ``CHECK_EVERY`` tokens, so the GPU is never left waiting: 174 /
242 / 183 tokens/s for the same bf16 / NF4 (fused) / bitsandbytes models (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

import torch
import transformers

# Tokens between the host's looks at the generated tokens (a sync each): at most this many made past an end-of-text.
CHECK_EVERY = 16


class Decoder:
    """One model, one static cache of ``max_len`` positions (prompt + new tokens), batch 1.

    With ``compiled`` the one-token step is ``torch.compile``'d in "reduce-overhead" mode (CUDA graphs on a GPU):
    the first call compiles it, the next ones record and replay graphs, and every later ``generate`` of this
    decoder reuses them (the cache is reset in place, its tensors keep their addresses).
    """

    def __init__(self, model: torch.nn.Module, max_len: int, compiled: bool = False) -> None:
        self.model = model
        self.max_len = max_len
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
        # the forward's name for it: `cache` in recent transformers, `past_key_values` (deprecated) in older 5.x
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.step = torch.compile(self._forward, mode="reduce-overhead") if compiled else self._forward

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position of ``ids`` [1, n], appended to the cache."""
        return self.model(input_ids=ids, use_cache=True, **{self.cache_arg: self.cache}).logits[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_ids: Iterable[int] = (),
        stop_after: int | None = None,
    ) -> torch.Tensor:
        """[1, prompt + new] token ids, as ``transformers``' ``generate`` returns them: greedy when temperature is 0,
        else sampled (top-p); ends after an end-of-text token (kept) or ``max_new_tokens``; ``stop_after`` ends it
        sooner without changing the cache's length (a warm-up)."""
        prompt = input_ids.shape[1]
        if input_ids.shape[0] != 1:
            raise ValueError(f"one sequence at a time, got a batch of {input_ids.shape[0]}")
        if prompt + max_new_tokens > self.max_len:
            raise ValueError(f"{prompt} prompt + {max_new_tokens} new tokens exceed the cache's {self.max_len}")
        self.cache.reset()
        eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
        out = torch.empty(max_new_tokens, dtype=torch.long, device=input_ids.device)
        token = self._choose(self._forward(input_ids), temperature, top_p)  # the prefill: eager, any length
        n = min(max_new_tokens, stop_after or max_new_tokens)
        done = 0
        for i in range(n):
            out[i] = token[0]
            if (eos.numel() and (i + 1) % CHECK_EVERY == 0) or i + 1 == n:  # and at the end, to trim
                hits = torch.isin(out[done : i + 1], eos).nonzero()
                if hits.numel():
                    return torch.cat([input_ids[0], out[: done + int(hits[0, 0]) + 1]])[None]
                done = i + 1
            if i + 1 < n:
                token = self._choose(self.step(token[None]), temperature, top_p)
        return torch.cat([input_ids[0], out[:n]])[None]

    @staticmethod
    def _choose(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """[1, vocab] logits -> [1] token: the argmax, or a draw from the tokens of the top-p mass."""
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            sorted_probs.masked_fill_(sorted_probs.cumsum(-1) - sorted_probs > top_p, 0)  # the first always kept
            return order.gather(-1, torch.multinomial(sorted_probs, 1))[:, 0]
        return torch.multinomial(probs, 1)[:, 0]
