"""Text generation from a trained model. For now: greedy decoding without a KV cache (the full decoder with
sampling, beam search and a KV cache comes with the generation entry point)."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(
    model,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    max_len: int,
    vocab_size: int,
    eod_id: int | None = None,
) -> list[int]:
    """Append the most likely next token `max_new_tokens` times (stopping at eod); returns the new ids only.

    The context is cut to the last `max_len` tokens; ids past `vocab_size` (embedding padding) are never chosen.
    `model` is any callable from a (1, n) id tensor to logits; every rank of a ZeRO-3 run must call this together.
    """
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-max_len:]], dtype=torch.long)
        next_id = int(model(x)[0, -1, :vocab_size].argmax())
        if next_id == eod_id:
            break
        ids.append(next_id)
        new.append(next_id)
    return new


def continue_text(logits, tokenizer, prompt: str, *, max_new_tokens: int = 40, max_len: int) -> str:
    """A greedy continuation of `prompt`; `logits` maps a (1, n) batch of ids to logits (e.g. `Engine.logits`,
    which every rank must call together under ZeRO-3)."""
    prompt_ids = tokenizer.encode(prompt)
    ids = greedy(
        logits, prompt_ids, max_new_tokens=max_new_tokens, max_len=max_len, vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod_id,
    )  # fmt: skip
    # decode with the prompt: a piece's leading space is dropped at the start of a decoded sequence
    return tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)) :]
