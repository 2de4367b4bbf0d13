"""Generation: the KV cache equals full forwards, every decoding rule does what it says, batches equal prompts alone."""

import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.generate import GenerationError, GenerationSettings, _continuation, choose, generate, probabilities
from pretrain.model import KVCache, Transformer

VOCAB = 100  # padded to 128 rows: ids 100..127 must never be chosen


def tiny_model(n_kv_heads=2, seq_len=48, seed=0) -> Transformer:
    cfg = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, seq_len=seq_len)
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # make the padding rows the most likely: a generator that picks one is caught
        model.output.weight[VOCAB:] = model.output.weight[:VOCAB].abs().sum(0) * 10
    return model.eval()


@torch.no_grad()
def greedy_reference(model, prompt, n, eod=None):
    """Greedy decoding with a full forward pass over the whole sequence per token (no cache)."""
    ids, out = list(prompt), []
    while len(out) < n and len(ids) <= model.cfg.seq_len:
        t = int(model(torch.tensor([ids]))[0, -1, :VOCAB].argmax())
        if t == eod:
            break
        out.append(t)
        ids.append(t)
    return out


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [3] * 13, [40]]


def run(model, prompts, **settings):
    defaults = {"max_new_tokens": 16, "stop_at_eod": False}
    return generate(model, prompts, GenerationSettings(**{**defaults, **settings}), vocab_size=VOCAB, eod_id=2)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_kv_cache_logits_equal_full_forward_at_every_position(n_kv_heads):
    model = tiny_model(n_kv_heads)
    ids = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch=3, capacity=30)
        parts = [model(ids[:, :7], cache=cache)]  # the prompt in one pass
        parts += [model(ids[:, i : i + 1], cache=cache) for i in range(7, 20)]  # then one token at a time
        parts.append(model(ids[:, 20:], cache=cache))  # and a chunk continuing the cache
    incremental = torch.cat(parts, dim=1)
    torch.testing.assert_close(incremental[..., :VOCAB], full[..., :VOCAB], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(incremental, full, rtol=1e-4, atol=1e-4)  # the padding rows' huge weights too


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_prompts_get_the_logits_they_get_alone(padding):
    model = tiny_model()
    lengths = [12, 7, 1]
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    tokens, valid = torch.zeros(3, 12, dtype=torch.long), torch.zeros(3, 12, dtype=torch.bool)
    for b, n in enumerate(lengths):
        cols = slice(12 - n, 12) if padding == "left" else slice(0, n)
        tokens[b, cols], valid[b, cols] = ids[b, :n], True
    nxt = torch.tensor([[17], [18], [19]])
    with torch.no_grad():
        cache = KVCache.for_model(model, batch=3, capacity=16)
        last = torch.tensor([11] * 3) if padding == "left" else torch.tensor(lengths) - 1
        first = model(tokens, cache=cache, valid=valid, select=last)
        second = model(nxt, cache=cache)
        for b, n in enumerate(lengths):
            alone = model(torch.cat([ids[b : b + 1, :n], nxt[b : b + 1]], dim=1))[0]
            torch.testing.assert_close(first[b, 0], alone[n - 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(second[b, 0], alone[n], rtol=1e-5, atol=1e-5)


def test_greedy_equals_full_forward_decoding_and_never_picks_padding_rows():
    model = tiny_model()
    got = run(model, PROMPTS)
    for prompt, c in zip(PROMPTS, got):
        assert c.ids == greedy_reference(model, prompt, 16)
        assert c.finish == "length" and c.prompt_tokens == len(prompt)
        assert all(t < VOCAB for t in c.ids)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_a_padded_batch_gives_each_prompt_the_tokens_it_gets_alone(padding, mode):
    model = tiny_model()
    extra = {"num_beams": 3, "stop_at_eod": True} if mode == "beams" else {}
    batch = run(model, PROMPTS, padding=padding, **extra)
    for prompt, c in zip(PROMPTS, batch):
        (alone,) = run(model, [prompt], padding=padding, **extra)
        assert c.ids == alone.ids and c.finish == alone.finish


def test_top_k_1_and_one_beam_equal_greedy():
    model = tiny_model()
    greedy = [c.ids for c in run(model, PROMPTS)]
    assert [c.ids for c in run(model, PROMPTS, temperature=1.0, top_k=1, seed=5)] == greedy
    assert [c.ids for c in run(model, PROMPTS, num_beams=1)] == greedy


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    kept = lambda p: (probabilities(logits, GenerationSettings(temperature=1.0, top_p=p)) > 0)[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False, False]  # 0.4 alone reaches 0.4
    assert kept(0.41) == [False, True, False, True, False]  # 0.4 + 0.3
    assert kept(0.7) == [False, True, False, True, False]  # exactly 0.7: reached, nothing more
    assert kept(0.71) == [False, True, False, True, True]
    assert kept(1.0) == [True] * 5
    out = probabilities(logits, GenerationSettings(temperature=1.0, top_p=0.71))[0]
    torch.testing.assert_close(out, torch.tensor([0, 0.4, 0, 0.3, 0.15]) / 0.85)


def test_top_k_min_p_temperature_and_repetition_penalty():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = lambda **kw: GenerationSettings(**{"temperature": 1.0, **kw})  # noqa: E731
    assert (probabilities(logits, s(top_k=2))[0] > 0).tolist() == [True, True, False, False]
    p = logits.softmax(-1)[0]
    keep = (p >= 0.3 * p.max()).tolist()
    assert (probabilities(logits, s(min_p=0.3))[0] > 0).tolist() == keep == [True, True, False, False]
    torch.testing.assert_close(probabilities(logits, s(temperature=2.0)), (logits / 2).softmax(-1))
    seen = torch.tensor([[True, False, False, True]])
    # a positive logit is divided by the penalty, a negative one multiplied: 2 -> 1, -1 -> -4
    greedy = GenerationSettings(repetition_penalty=4.0)
    assert choose(logits, greedy, seen=seen).tolist() == [1]
    assert choose(torch.tensor([[2.0, 0.6, 0.0, -1.0]]), greedy, seen=seen).tolist() == [1]  # 2 / 4 = 0.5 < 0.6
    assert choose(torch.tensor([[2.0, 0.4, 0.0, -1.0]]), greedy, seen=seen).tolist() == [0]  # 0.5 > 0.4
    assert choose(torch.tensor([[-1.0, -2.0]]), greedy, seen=torch.tensor([[True, False]])).tolist() == [1]  # -4 < -2


def test_a_seed_reproduces_samples_and_another_seed_differs():
    model = tiny_model()
    kw = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 24}
    a, b, c = run(model, PROMPTS, seed=7, **kw), run(model, PROMPTS, seed=7, **kw), run(model, PROMPTS, seed=8, **kw)
    assert [x.ids for x in a] == [x.ids for x in b]
    assert [x.ids for x in a] != [x.ids for x in c]
    assert all(t < VOCAB for x in a + c for t in x.ids)


def test_sampling_follows_the_distribution():
    """Thousands of draws from a known distribution land where its probabilities say (within 4 sigma)."""
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -3.0]]).repeat(4000, 1)
    settings = GenerationSettings(temperature=1.0, top_k=4)
    counts = torch.bincount(choose(logits, settings, generators=torch.Generator().manual_seed(0)), minlength=5)
    expected = probabilities(logits[:1], settings)[0] * 4000
    assert counts[4] == 0
    for got, want in zip(counts.tolist(), expected.tolist()):
        assert abs(got - want) <= 4 * math.sqrt(want + 1)


@torch.no_grad()
def test_beam_search_as_wide_as_the_vocabulary_finds_the_most_likely_continuation():
    """Two new tokens with VOCAB beams: beam search sees every pair, so it must return the best of all VOCAB^2
    continuations (found here by brute force), scored by its log probability (length_penalty 0)."""
    model = tiny_model()
    for prompt in PROMPTS[:2]:
        first = model(torch.tensor([prompt]))[0, -1, :VOCAB].log_softmax(-1)  # (VOCAB,)
        pairs = torch.tensor([prompt + [t] for t in range(VOCAB)])
        second = model(pairs)[:, -1, :VOCAB].log_softmax(-1)  # (VOCAB, VOCAB)
        total = first[:, None] + second
        best = int(total.argmax())
        (beam,) = run(model, [prompt], max_new_tokens=2, num_beams=VOCAB, length_penalty=0.0)
        assert beam.ids == [best // VOCAB, best % VOCAB] and beam.finish == "length"
        assert beam.score == pytest.approx(float(total.max()), abs=1e-4)
        (narrow,) = run(model, [prompt], max_new_tokens=2, num_beams=2, length_penalty=0.0)
        assert narrow.score <= beam.score + 1e-6


def test_stops_at_the_end_of_document_and_at_the_context():
    model = tiny_model(seq_len=24)
    prompt = [7, 8, 9]
    free = greedy_reference(model, prompt, 10)
    eod = free[4]  # pretend the fifth greedy token ends documents
    got = generate(model, [prompt], GenerationSettings(max_new_tokens=10), vocab_size=VOCAB, eod_id=eod)[0]
    assert got.finish == "eod" and got.ids == free[: free.index(eod)]
    (full,) = run(model, [[4] * 20], max_new_tokens=30)
    assert full.finish == "context" and len(full.ids) == 5  # 20 + 5 tokens: the last one has no position to go in
    assert full.ids == greedy_reference(model, [4] * 20, 30)
    (beams,) = run(model, [[4] * 20], max_new_tokens=30, num_beams=2)
    assert beams.finish == "context" and len(beams.ids) == 5


def test_stop_strings_cut_the_text(tokenizer):
    model_cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, seq_len=64)
    model = Transformer(model_cfg)
    model.init_weights(3)
    model.eval()
    prompt = tokenizer.encode("The state of the Union is")
    kw = {"vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id, "decode": tokenizer.decode}
    (free,) = generate(model, [prompt], GenerationSettings(max_new_tokens=30, stop_at_eod=False), **kw)
    assert len(free.text) > 6 and free.text == tokenizer.decode(prompt + free.ids)[len(tokenizer.decode(prompt)) :]
    stop = free.text[3:6]
    (cut,) = generate(model, [prompt], GenerationSettings(max_new_tokens=30, stop_at_eod=False, stop=[stop]), **kw)
    assert cut.finish == "stop" and cut.text == free.text[: free.text.find(stop)]
    assert cut.ids == free.ids[: len(cut.ids)] and len(cut.ids) < len(free.ids)


def test_bad_settings_and_prompts_are_refused_by_name():
    model = tiny_model(seq_len=16)
    with pytest.raises(GenerationError, match="top_p"):
        run(model, PROMPTS, top_p=0.0)
    with pytest.raises(GenerationError, match="num_beams"):
        run(model, PROMPTS, num_beams=2, temperature=0.7)
    with pytest.raises(GenerationError, match="prompt 1: 17 tokens"):
        run(model, [[1], [1] * 17])
    with pytest.raises(GenerationError, match="prompt 0: token id 100"):
        run(model, [[100]])
    with pytest.raises(GenerationError, match="stop"):
        run(model, [[1]], stop=["x"])  # no decode function


def test_an_empty_prompt_starts_a_document():
    model = tiny_model()
    (c,) = run(model, [[]], max_new_tokens=5)
    assert c.ids == greedy_reference(model, [2], 5) and c.prompt_tokens == 1


def test_a_prompt_samples_the_same_tokens_in_any_batch():
    """Each prompt draws from its own generator (seed + its index, or the row seeds given): its sample does not
    depend on the other prompts, their number or the padding side."""
    model = tiny_model()
    kw = {"temperature": 1.0, "top_k": 20, "max_new_tokens": 12}
    batch = run(model, PROMPTS, seed=3, **kw)
    for i, prompt in enumerate(PROMPTS):
        (alone,) = run(model, [prompt], seed=3 + i, **kw)
        assert alone.ids == batch[i].ids
    (right,) = run(model, [PROMPTS[1]], seed=0, padding="right", **kw)[:1]
    mixed = generate(
        model, PROMPTS[1:3], GenerationSettings(stop_at_eod=False, padding="right", **kw), vocab_size=VOCAB,
        eod_id=2, row_seeds=[0, 99],
    )  # fmt: skip
    assert mixed[0].ids == right.ids


@torch.no_grad()
def test_beam_search_applies_the_repetition_penalty_to_each_beam():
    """Two new tokens, VOCAB beams, penalty 3: the best pair under penalised log probabilities, by brute force
    (the second token's logits are penalised for the prompt and the first token)."""
    model = tiny_model()
    prompt, penalty = PROMPTS[0], 3.0

    def penalised(logits, seen):
        logits = logits.clone()
        for t in seen:
            logits[..., t] = logits[..., t] / penalty if logits[..., t] > 0 else logits[..., t] * penalty
        return logits.log_softmax(-1)

    first = penalised(model(torch.tensor([prompt]))[0, -1, :VOCAB], set(prompt))
    second = model(torch.tensor([prompt + [t] for t in range(VOCAB)]))[:, -1, :VOCAB]
    total = torch.stack([first[t] + penalised(second[t], set(prompt) | {t}) for t in range(VOCAB)])
    best = int(total.argmax())
    (beam,) = run(model, [prompt], max_new_tokens=2, num_beams=VOCAB, length_penalty=0.0, repetition_penalty=penalty)
    assert beam.ids == [best // VOCAB, best % VOCAB]
    assert beam.score == pytest.approx(float(total.max()), abs=1e-4)
    (plain,) = run(model, [prompt], max_new_tokens=2, num_beams=VOCAB, length_penalty=0.0)
    assert plain.score != pytest.approx(beam.score)


def test_generation_in_training_mode_with_activation_checkpointing_uses_the_cache():
    model = tiny_model()
    model.cfg.activation_checkpointing = True
    want = [c.ids for c in run(model, PROMPTS)]
    model.train()
    assert [c.ids for c in run(model, PROMPTS)] == want


def test_the_cache_holds_only_what_the_context_allows():
    model = tiny_model(seq_len=24)
    (c,) = run(model, [[4] * 20], max_new_tokens=10**9)  # a cache sized by max_new_tokens would not fit in memory
    assert c.finish == "context" and len(c.ids) == 5


def test_a_character_split_between_prompt_and_output_belongs_to_the_output(tokenizer):
    ids = tokenizer.encode("Hi 日本 ok")  # CJK falls back to bytes with this English tokenizer
    cut = next(k for k in range(1, len(ids)) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    assert _continuation(tokenizer.decode, ids[:cut], ids[cut:]) == "Hi 日本 ok"[len(tokenizer.decode(ids[:cut])) - 1 :]
