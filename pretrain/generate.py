"""Text generation from a trained model. For now: greedy decoding without a KV cache (the full decoder with
sampling, beam search and a KV cache comes with the generation entry point)."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy(
    model: torch.nn.Module,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    max_len: int,
    vocab_size: int,
    eod_id: int | None = None,
    device=None,
) -> list[int]:
    """Append the most likely next token `max_new_tokens` times (stopping at eod); returns the new ids only.

    The context is cut to the last `max_len` tokens; ids past `vocab_size` (embedding padding) are never chosen.
    Every rank of a ZeRO-3 run must call this together.
    """
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-max_len:]], dtype=torch.long, device=device)
        next_id = int(model(x)[0, -1, :vocab_size].argmax())
        if next_id == eod_id:
            break
        ids.append(next_id)
        new.append(next_id)
    return new
