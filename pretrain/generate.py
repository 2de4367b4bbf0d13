"""Text generation with a KV cache: greedy, sampling (temperature, top-k, top-p, min-p, repetition penalty) and beam
search, for a batch of prompts of different lengths at once.

    settings = GenerationSettings(max_new_tokens=100, temperature=0.8, top_p=0.95, seed=1)
    done = generate(model, [tokenizer.encode(p) for p in prompts], settings, vocab_size=tokenizer.vocab_size,
                    eod_id=tokenizer.eod_id, decode=tokenizer.decode)
    done[0].text, done[0].ids, done[0].finish        # "eod", "stop", "length" or "context"

Each step is one forward pass of the whole batch over one new token per row; the prompts go through in one pass
(padded left or right: the cache gives every row its own positions and attention mask, so a padded batch gives
each prompt the tokens it gets alone). The prompt's logits are computed only at each row's last token.

Sampling applies, in this order: repetition penalty (to every token of the prompt and of the output so far: a
positive logit is divided by it, a negative one multiplied), temperature, top-k, top-p (keep the smallest set of
most likely tokens whose probability reaches p), min-p (drop tokens less likely than min_p times the most likely
one); then draws from what is left with a generator seeded by `seed`. temperature 0 is greedy decoding.
Each prompt samples from its own generator, seeded with `seed` + its index (or the `row_seeds` given), so its
sample does not depend on the other prompts in the batch.
Beam search keeps `num_beams` sequences per prompt by total log probability (the repetition penalty applies to each
beam's own tokens); a beam that ends the document is finished with the score log p / new_tokens ** length_penalty
(the end-of-document token counted), and a prompt is done once it has num_beams finished beams and its best running
beam, scored at its current length, is no better than the worst of them (as Hugging Face's early_stopping=False).
Ids past `vocab_size` (the embedding's padding rows) are never chosen. A row stops at the end-of-document id (not
part of its output), at a stop string (the text is cut before it; `ids` end with the token that completed it; beam
search cuts its best beam's text at the end), after max_new_tokens, or when the model's context (model.seq_len) is
full. Rows that have finished stay in the batch (fed padding) until every row has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from pretrain.errors import BadInput
from pretrain.model import KVCache


class GenerationError(BadInput, ValueError):
    """A generation setting or prompt that cannot be used; the message names it."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (the most likely token); above 0: sample
    top_k: int = 0  # sample among the k most likely tokens; 0: all
    top_p: float = 1.0  # nucleus: the smallest set of most likely tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    num_beams: int = 1  # > 1: beam search (deterministic; with temperature 0)
    length_penalty: float = 1.0  # beam search: a finished beam scores log p / new_tokens ** length_penalty
    stop_at_eod: bool = True  # stop a row at the end-of-document id
    stop: Sequence[str] = ()  # stop a row once its text contains one of these (cut before it)
    seed: int = 0  # of the sampling generator: the same seed gives the same samples
    padding: Literal["left", "right"] = "left"  # how prompts of different lengths share the batch

    def check(self) -> None:
        problems = {
            "max_new_tokens": self.max_new_tokens < 1,
            "temperature": not 0 <= self.temperature < math.inf,
            "top_k": self.top_k < 0,
            "top_p": not 0 < self.top_p <= 1,
            "min_p": not 0 <= self.min_p < 1,
            "repetition_penalty": not 0 < self.repetition_penalty < math.inf,
            "num_beams": self.num_beams < 1,
            "length_penalty": not math.isfinite(self.length_penalty),
            "padding": self.padding not in ("left", "right"),
        }
        bad = [k for k, v in problems.items() if v]
        if bad:
            raise GenerationError(f"{bad[0]}: {getattr(self, bad[0])!r} is out of range")
        if self.num_beams > 1 and self.temperature > 0:
            raise GenerationError("num_beams: beam search is deterministic; use it with temperature 0")
        if any(not s for s in self.stop):
            raise GenerationError("stop: an empty stop string")


@dataclass
class Completion:
    ids: list[int]  # the new tokens (without the end-of-document id)
    finish: str  # "eod", "stop" (a stop string), "length" (max_new_tokens) or "context" (model.seq_len is full)
    prompt_tokens: int
    text: str | None = None  # the new text, when a decode function was given (cut before a stop string)
    score: float | None = None  # beam search: the beam's length-penalised log probability


@dataclass
class _Row:
    prompt: list[int]
    new: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None
    prompt_text: str | None = None


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    vocab_size: int,
    eod_id: int | None,
    decode: Callable[[list[int]], str] | None = None,
    forward: Callable[..., torch.Tensor] | None = None,
    row_seeds: Sequence[int] | None = None,
) -> list[Completion]:
    """Continue each prompt (a list of token ids; an empty one starts a document); one Completion per prompt.

    `model` is a pretrain.model.Transformer (its config, device and dtype size the cache); `forward` calls it
    (default: the model itself; under ZeRO-3 the engine, which every rank calls together with the same inputs).
    `decode` (ids -> text) is needed for stop strings and fills Completion.text. `row_seeds`: each prompt's
    sampling seed (default: settings.seed + the prompt's index)."""
    settings.check()
    if settings.stop and decode is None:
        raise GenerationError("stop: stop strings need the tokenizer's decode")
    forward = forward or model
    seq_len = model.cfg.seq_len
    rows = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in p] or ([eod_id] if eod_id is not None else [])
        if not ids:
            raise GenerationError(f"prompt {i}: empty, and the tokenizer has no end-of-document id to start from")
        if len(ids) > seq_len:
            raise GenerationError(
                f"prompt {i}: {len(ids)} tokens do not fit the model's context of {seq_len} (model.seq_len); shorten it"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i}: token id {bad[0]} is outside the vocabulary of {vocab_size}")
        rows.append(_Row(ids, prompt_text=decode(ids) if decode else None))
    if not rows:
        return []
    if row_seeds is None:
        row_seeds = [settings.seed + i for i in range(len(rows))]
    elif len(row_seeds) != len(rows):
        raise GenerationError(f"row_seeds: {len(row_seeds)} seeds for {len(rows)} prompts")
    with torch.no_grad():
        if settings.num_beams > 1:
            return _beam_search(model, forward, rows, settings, vocab_size, eod_id, decode)
        return _sample(model, forward, rows, settings, vocab_size, eod_id, decode, row_seeds)


def _prefill(model, forward, prompts: list[list[int]], settings, pad_id: int):
    """Run the padded prompts through the model into a new cache (room for every token a row can still take);
    the logits at each row's last token."""
    device = model.tok_embeddings.weight.device
    n, width = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    valid = torch.zeros((n, width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        start = width - len(p) if settings.padding == "left" else 0
        tokens[i, start : start + len(p)] = torch.tensor(p)
        valid[i, start : start + len(p)] = True
    last = torch.full((n,), width - 1) if settings.padding == "left" else torch.tensor([len(p) - 1 for p in prompts])
    room = min(settings.max_new_tokens, model.cfg.seq_len - min(len(p) for p in prompts) + 1)
    cache = KVCache.for_model(model, batch=n, capacity=width + room)
    logits = forward(tokens.to(device), cache=cache, valid=valid, select=last.to(device))
    return cache, logits[:, 0].float()


def _seen(prompts: list[list[int]], settings, vocab_size: int, device) -> torch.Tensor | None:
    """Which tokens each row holds (prompt and output), for the repetition penalty (None without one)."""
    if settings.repetition_penalty == 1.0:
        return None
    seen = torch.zeros((len(prompts), vocab_size), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        seen[i, p] = True
    return seen


def _sample(model, forward, rows: list[_Row], settings, vocab_size, eod_id, decode, seeds) -> list[Completion]:
    device = model.tok_embeddings.weight.device
    seq_len = model.cfg.seq_len
    pad_id = eod_id if eod_id is not None else 0
    cache, logits = _prefill(model, forward, [r.prompt for r in rows], settings, pad_id)
    gens = [torch.Generator(device=device).manual_seed(s) for s in seeds] if settings.temperature > 0 else None
    seen = _seen([r.prompt for r in rows], settings, vocab_size, device)
    for step in range(settings.max_new_tokens):
        chosen = choose(logits[:, :vocab_size], settings, seen=seen, generators=gens)
        if seen is not None:
            seen[torch.arange(len(rows), device=device), chosen] = True  # finished rows' marks are never read
        chosen = chosen.tolist()
        for r, t in zip(rows, chosen):
            if r.finish is None:
                _advance(r, t, settings, eod_id, decode, seq_len)
        running = [r.finish is None for r in rows]
        if not any(running) or step + 1 == settings.max_new_tokens:
            break
        tokens = torch.tensor([[t if ok else pad_id] for t, ok in zip(chosen, running)])
        logits = forward(tokens.to(device), cache=cache, valid=torch.tensor(running)[:, None])[:, 0].float()
    return [_completion(r, decode) for r in rows]


def _advance(r: _Row, token: int, settings, eod_id, decode, seq_len: int) -> None:
    """Add a chosen token to a row and decide whether the row is finished."""
    if settings.stop_at_eod and token == eod_id:
        r.finish = "eod"
        return
    r.new.append(token)
    if settings.stop and _stop_in_tail(r, settings.stop, decode):
        text = _new_text(r, decode)
        cut = min((i for i in (text.find(s) for s in settings.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.finish, r.text = "stop", text[:cut]
            return
    if len(r.new) == settings.max_new_tokens:
        r.finish = "length"
    elif len(r.prompt) + len(r.new) > seq_len:  # the last new token cannot be fed back: no position left
        r.finish = "context"


def _continuation(decode, before: list[int], after: list[int], before_text: str | None = None) -> str:
    """The text `after` adds to `before`: decoded together (a piece's leading space is dropped at the start of a
    decoded sequence) and cut where the texts part (a character may span the last token of `before`, whose bytes
    alone decode to a replacement character, and the first of `after`)."""
    before_text = decode(before) if before_text is None else before_text
    full = decode(before + after)
    return full[len(os.path.commonprefix([before_text, full])) :]


def _new_text(r: _Row, decode) -> str:
    return _continuation(decode, r.prompt, r.new, r.prompt_text)


def _stop_in_tail(r: _Row, stops: Sequence[str], decode) -> bool:
    """Whether a stop string may have just completed: searched in the text of the last few tokens only (a string
    of L characters spans at most 4 L byte-fallback tokens), so a step costs the same at any length."""
    k = 4 * max(len(s) for s in stops) + 2
    ids = r.prompt + r.new
    tail = _continuation(decode, ids[-k - 2 : -k], ids[-k:])
    return any(s in tail for s in stops)


def _completion(r: _Row, decode) -> Completion:
    if r.finish is None:
        r.finish = "length"
    text = r.text if r.text is not None else (_new_text(r, decode) if decode else None)
    return Completion(ids=r.new, finish=r.finish, prompt_tokens=len(r.prompt), text=text)


def penalise(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """The repetition penalty: a seen token's positive logit divided by `penalty`, a negative one multiplied."""
    if seen is None:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def choose(
    logits: torch.Tensor, settings: GenerationSettings, *, seen: torch.Tensor | None = None, generators=None
) -> torch.Tensor:
    """The next token of each row (batch,) from fp32 logits (batch, vocab), as the settings say; sampling draws
    row i with generators[i] (one generator for all rows if a single one is given)."""
    logits = penalise(logits, seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, settings)
    if generators is None or isinstance(generators, torch.Generator):
        return torch.multinomial(probs, 1, generator=generators)[:, 0]
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def probabilities(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, top-p and min-p (renormalised)."""
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(dim=-1)
    if settings.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = before >= settings.top_p  # the set already reached p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if settings.min_p > 0:
        probs = probs.masked_fill(probs < settings.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


@dataclass
class _Beam:
    tokens: list[int]
    logp: float


def _beam_search(model, forward, rows: list[_Row], settings, vocab_size, eod_id, decode) -> list[Completion]:
    device = model.tok_embeddings.weight.device
    seq_len = model.cfg.seq_len
    width, lp = settings.num_beams, settings.length_penalty
    pad_id = eod_id if eod_id is not None else 0
    n = len(rows)
    prompts = [r.prompt for r in rows for _ in range(width)]
    cache, logits = _prefill(model, forward, prompts, settings, pad_id)
    seen = _seen(prompts, settings, vocab_size, device)
    beams = [[_Beam([], 0.0 if j == 0 else -math.inf) for j in range(width)] for _ in rows]  # one start per prompt
    finished: list[list[tuple[float, list[int], str]]] = [[] for _ in rows]
    done = [False] * n

    def score(logp: float, length: int) -> float:
        return logp / max(length, 1) ** lp

    for step in range(settings.max_new_tokens):
        logprobs = penalise(logits[:, :vocab_size], seen, settings.repetition_penalty).log_softmax(dim=-1)
        beam_logp = torch.tensor([b.logp for row in beams for b in row], device=device)
        total = (logprobs + beam_logp[:, None]).view(n, width * vocab_size)
        top_values, top_flat = (x.tolist() for x in total.topk(2 * width, dim=-1))  # one sync per step
        next_tokens, order = [], []
        for i in range(n):
            if done[i]:
                next_tokens += [pad_id] * width
                order += [i * width] * width
                continue
            chosen = []
            for value, idx in zip(top_values[i], top_flat[i]):
                j, token = divmod(idx, vocab_size)
                if value == -math.inf:
                    break
                parent = beams[i][j]
                if settings.stop_at_eod and token == eod_id:
                    finished[i].append((score(value, len(parent.tokens) + 1), parent.tokens, "eod"))
                    continue
                chosen.append((j, _Beam(parent.tokens + [token], value)))
                if len(chosen) == width:
                    break
            finished[i] = sorted(finished[i], key=lambda h: -h[0])[:width]
            new_len = len(chosen[0][1].tokens) if chosen else 0
            full = len(rows[i].prompt) + new_len > seq_len
            best_running = max((score(b.logp, new_len) for _, b in chosen), default=-math.inf)
            if full or not chosen or (len(finished[i]) == width and best_running <= finished[i][-1][0]):
                done[i] = True
                reason = "context" if full else "length"
                finished[i] += [(score(b.logp, len(b.tokens)), b.tokens, reason) for _, b in chosen]
                next_tokens += [pad_id] * width
                order += [i * width] * width
                continue
            while len(chosen) < width:  # fewer continuations than beams (a tiny vocabulary): repeat the last
                chosen.append((chosen[-1][0], _Beam(chosen[-1][1].tokens, -math.inf)))
            beams[i] = [b for _, b in chosen]
            next_tokens += [b.tokens[-1] for b in beams[i]]
            order += [i * width + j for j, _ in chosen]
        if all(done) or step + 1 == settings.max_new_tokens:
            break
        cache.reorder(order)
        tokens = torch.tensor(next_tokens, device=device)
        if seen is not None:  # each beam's history is its parent's, plus its new token
            seen = seen[torch.tensor(order, device=device)]
            seen[torch.arange(n * width, device=device), tokens] = True
        valid = torch.tensor([[not done[k // width]] for k in range(n * width)])
        logits = forward(tokens[:, None], cache=cache, valid=valid)[:, 0].float()
    out = []
    for i, r in enumerate(rows):
        if not done[i]:
            finished[i] += [(score(b.logp, len(b.tokens)), b.tokens, "length") for b in beams[i] if b.logp > -math.inf]
        best_score, tokens, reason = max(finished[i], key=lambda h: h[0])
        r.new, r.finish = list(tokens), reason
        if settings.stop and decode:
            text = _new_text(r, decode)
            cut = min((k for k in (text.find(s) for s in settings.stop) if k >= 0), default=-1)
            if cut >= 0:
                r.finish, r.text = "stop", text[:cut]
        c = _completion(r, decode)
        c.score = best_score
        out.append(c)
    return out


def continue_text(
    model, tokenizer, prompt: str, *, max_new_tokens: int = 40, forward: Callable[..., torch.Tensor] | None = None
) -> str:
    """A greedy continuation of `prompt` (the demo's and the trainer's sample); under ZeRO-3 `forward` is the
    engine's, which every rank calls together."""
    (done,) = generate(
        model, [tokenizer.encode(prompt)], GenerationSettings(max_new_tokens=max_new_tokens),
        vocab_size=tokenizer.vocab_size, eod_id=tokenizer.eod_id, decode=tokenizer.decode, forward=forward,
    )  # fmt: skip
    return done.text
