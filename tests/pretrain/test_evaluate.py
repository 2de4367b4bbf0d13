"""Evaluation: bytes per token, windows over a stream of documents, and loss / bits per byte checked against an
independent computation on the same text; the trainer's evaluation goes through the same code."""

import json
import math

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.config import BatchPlan, DatasetSpec, ModelConfig
from pretrain.data import DataError, build_dataset
from pretrain.errors import BadInput
from pretrain.evaluate import (
    EvalError,
    Evaluator,
    TokenBytes,
    Totals,
    cut_windows,
    evaluate,
    model_logits,
    source_windows,
)
from pretrain.metrics import Metrics
from pretrain.model import Transformer

from ..helpers import TRICKY, tokenize, write_jsonl

SEQ = 48


@pytest.fixture(scope="module")
def token_bytes(tokenizer):
    return TokenBytes(tokenizer)


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=128)
    m = Transformer(cfg)
    m.init_weights(0)
    return m.eval()


@pytest.fixture(scope="module")
def texts(speeches):
    """Short documents: the tricky ones and paragraphs of real speeches."""
    paragraphs = [p for s in speeches[40:43] for p in s.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return TRICKY + paragraphs[:30]


def reference(model, tokenizer, texts, seq_len) -> tuple[float, int]:
    """Nats and tokens, computed without pretrain.evaluate: the stream EOD, doc, EOD, doc, EOD ... in windows of
    seq_len + 1 tokens starting every seq_len tokens, each run alone through the model."""
    stream = [tokenizer.eod_id]
    for text in texts:
        stream += tokenizer.encode(text) + [tokenizer.eod_id]
    nats, tokens = 0.0, 0
    for start in range(0, len(stream) - 1, seq_len):
        window = torch.tensor(stream[start : start + seq_len + 1])
        with torch.no_grad():
            logp = torch.log_softmax(model(window[None, :-1])[0].double(), dim=-1)
        nats -= logp.gather(1, window[1:, None]).sum().item()
        tokens += len(window) - 1
    assert tokens == len(stream) - 1
    return nats, tokens


def test_token_bytes_are_exact_on_real_and_tricky_text(tokenizer, token_bytes, speeches):
    for text in TRICKY + [s.read_text(encoding="utf-8") for s in speeches[:5]] + ["  ", "\t", "\ufeff"]:
        assert token_bytes.of_document(tokenizer.encode(text)) == len(text.encode("utf-8")), repr(text[:40])
    # A document's first piece carries the dummy prefix's "▁", other pieces a real space; after eod or bos the
    # next document starts
    ids = tokenizer.encode("hello there")
    row = np.array([tokenizer.eod_id, *ids, tokenizer.bos_id, *ids])
    assert token_bytes.count(row[:-1], row[1:]) == 2 * len("hello there")
    # The one exception: sentencepiece cannot tell "▁" (U+2581, 3 bytes) from a space (1 byte); decode neither
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"
    assert token_bytes.of_document(tokenizer.encode("a\u2581b")) == len("a b")


@pytest.mark.parametrize("seq_len,batch", [(1, 1), (5, 3), (16, 1), (64, 4)])
def test_windows_predict_every_token_once_with_the_context_before_it(seq_len, batch):
    rng = np.random.default_rng(seq_len)
    for n in (1, 2, seq_len, seq_len + 1, 200, 201):
        tokens = np.arange(n)
        cuts = np.sort(rng.choice(np.arange(1, n), size=min(5, n - 1), replace=False)) if n > 1 else []
        out = list(cut_windows(np.split(tokens, cuts), seq_len=seq_len, batch_size=batch))
        predicted = np.concatenate([w[:, 1:].ravel() for w in out]) if out else np.zeros(0, int)
        assert np.array_equal(predicted, tokens[1:]), (n, seq_len, batch)
        rows = [row for w in out for row in w]
        for row in rows:  # each window is consecutive tokens, starting every seq_len tokens
            assert np.array_equal(row, np.arange(row[0], row[0] + len(row))) and row[0] % seq_len == 0
        assert all(w.shape[1] == seq_len + 1 for w in out[:-1]) and all(len(w) <= batch for w in out)


def test_bits_per_byte_agree_with_an_independent_computation(tmp_path, tokenizer, token_bytes, model, texts):
    path = write_jsonl(tmp_path / "held_out.jsonl", texts)
    batches = source_windows([str(path)], tokenizer, seq_len=SEQ, batch_size=3)
    totals = evaluate(model_logits(model), token_bytes, batches)

    nats, tokens = reference(model, tokenizer, texts, SEQ)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (totals.tokens, totals.bytes, totals.documents) == (tokens, text_bytes, len(texts))
    assert totals.bpb == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-6)
    assert totals.loss == pytest.approx(nats / tokens, rel=1e-6)
    assert totals.ppl == pytest.approx(math.exp(nats / tokens), rel=1e-6)
    assert json.loads(json.dumps(totals.as_dict()))["bpb"] == totals.bpb


def test_one_document_in_one_window_is_scored_with_its_whole_context(tokenizer, token_bytes, model):
    text = TRICKY[4]
    ids = [tokenizer.eod_id, *tokenizer.encode(text), tokenizer.eod_id]
    assert len(ids) <= 128
    ev = Evaluator(model_logits(model), token_bytes)
    ev.add(np.array([ids]))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    nats = -logp.gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert ev.totals().bpb == pytest.approx(nats / math.log(2) / len(text.encode("utf-8")), rel=1e-6)


def test_shards_and_text_give_the_same_totals(tmp_path, tokenizer_path, tokenizer, token_bytes, model, texts):
    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    assert tokenize([path], tmp_path / "data", tokenizer_path, "--val-fraction", "0") == 0
    run = model_logits(model)

    def totals(paths, **kw):
        return evaluate(run, token_bytes, source_windows(paths, tokenizer, seq_len=SEQ, batch_size=4, **kw))

    text = totals([str(path)])
    assert (text.bytes, text.documents) == (sum(len(t.encode("utf-8")) for t in texts), len(texts))
    for shards in ([str(tmp_path / "data")], [str(tmp_path / "data" / "train" / "shard_00000")]):
        same = totals(shards, split="train")
        assert (same.tokens, same.bytes, same.documents) == (text.tokens, text.bytes, text.documents)
        assert same.nats == pytest.approx(text.nats, rel=1e-9)
    # the limits: whole documents, or a number of predicted tokens
    first = write_jsonl(tmp_path / "first.jsonl", texts[:5])
    assert totals([str(tmp_path / "data")], split="train", max_documents=5) == totals([str(first)])
    cut = totals([str(path)], max_tokens=100)
    assert cut.tokens == 100 and cut.documents < len(texts)
    # sources are read in order as one stream
    both = totals([str(first), str(tmp_path / "data")], split="train")
    assert both.documents == len(texts) + 5


def test_bad_sources_are_refused_with_their_path(tmp_path, tokenizer, tiny_dataset, speeches):
    def windows(paths, **kw):
        return list(source_windows(paths, tokenizer, seq_len=SEQ, batch_size=2, **kw))

    with pytest.raises(EvalError, match=f"{tmp_path / 'nowhere.jsonl'}: no such file"):
        windows([str(tmp_path / "nowhere.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(EvalError, match=f"{bad}:2: 'text' is int"):
        windows([str(bad)])
    with pytest.raises(EvalError, match=f"{tiny_dataset} has no 'test' shards \\(it has: train, val\\)"):
        windows([str(tiny_dataset)], split="test")

    from data_prep import train_tokenizer
    from pretrain.tokenizer import Tokenizer

    other = tmp_path / "other"
    argv = [str(speeches[0]), "--output", str(other), "--vocab-size", "400", "--quiet"]
    assert train_tokenizer.main(argv) == 0
    with pytest.raises(DataError, match=f"{tiny_dataset} was tokenized with .*sp.model") as e:
        list(source_windows([str(tiny_dataset)], Tokenizer(other.with_suffix(".model")), seq_len=SEQ, batch_size=2))
    assert isinstance(e.value, BadInput)


class Engine:
    """What Trainer.evaluate asks of an engine: logits (every rank together under ZeRO-3)."""

    def __init__(self, model):
        self.logits = model_logits(model)


def test_the_trainer_evaluates_with_the_same_code(tmp_path, tokenizer, token_bytes, model, tiny_dataset):
    from pretrain.config import OptimConfig, TrainConfig
    from pretrain.distributed import World
    from pretrain.job import StopRequest
    from pretrain.trainer import Trainer

    plan = BatchPlan(global_batch=4, micro_batch=2, world_size=1, seq_len=32)
    val = build_dataset([DatasetSpec(str(tiny_dataset))], "val", seq_len=32, seed=1, tokenizer=tokenizer.describe(),
                        key="data.datasets")  # fmt: skip
    trainer = Trainer(
        engine=Engine(model), data=val, plan=plan, world=World(), checkpoints=None,
        metrics=Metrics(tmp_path, rank=0, tensorboard=False), stop=StopRequest([], grace=60), optim=OptimConfig(),
        train=TrainConfig(max_steps=1, global_batch_seqs=4), save_every=0, log_every=1, flops_per_token=1,
        peak_flops=1.0, val_data=val, eval_batches=3, token_bytes=token_bytes,
    )  # fmt: skip
    with trainer:
        values = trainer.evaluate(7)
    batches = [mb for b in range(3) for mb in val.batch(b, plan, 0)]
    totals = evaluate(model_logits(model), token_bytes, batches)
    assert values == {"eval/loss": totals.loss, "eval/ppl": totals.ppl, "eval/bpb": totals.bpb}
    assert totals.tokens == 3 * 4 * 32 and 2 < totals.bytes / totals.tokens < 6
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("eval/bpb") == totals.bpb and m["step"] == 7 for m in logged)


def _reduce_on_rank(rank: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        part = Totals(nats=0.1 + rank, tokens=10 + rank, bytes=40 + rank, documents=rank)
        out.put((rank, part.reduce()))
    finally:
        dist.destroy_process_group()


def test_totals_are_summed_over_ranks():
    from ..helpers import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_reduce_on_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert results[0] == results[1] == Totals(nats=pytest.approx(1.2), tokens=21, bytes=81, documents=1)
    assert Totals(nats=3.0, tokens=2).reduce() == Totals(nats=3.0, tokens=2)  # no process group: itself


def test_a_text_holding_the_whitespace_marker_is_counted_as_its_tokens_with_a_warning(
    tmp_path, tokenizer, token_bytes, model, caplog
):
    path = write_jsonl(tmp_path / "marked.jsonl", ["a\u2581b", "plain"])
    totals = evaluate(model_logits(model), token_bytes, source_windows([str(path)], tokenizer, seq_len=8, batch_size=2))
    assert totals.bytes == len("a b") + len("plain")  # "▁" counts as the space the tokenizer takes it for
    assert "1 document(s) hold the character '▁' (U+2581)" in caplog.text
