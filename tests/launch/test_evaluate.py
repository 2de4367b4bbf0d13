"""launch/evaluate.py on a real checkpoint made in this process: the JSON result agrees with evaluating the
trained model's weights directly, and bad input exits 2 naming the file."""

import json

import pytest

from pretrain.evaluate import TokenBytes, evaluate, model_logits, source_windows

from ..helpers import TRICKY, write_jsonl


def evaluate_cli(argv):
    from launch import evaluate as cli

    return cli.main([str(a) for a in argv])


def test_the_result_of_a_checkpoint_agrees_with_its_weights(tmp_path, tiny_run, tokenizer, speeches, capsys):
    run, engine = tiny_run
    texts = TRICKY + [speeches[50].read_text(encoding="utf-8")[:3000]]
    data = write_jsonl(tmp_path / "held_out.jsonl", texts)
    out = tmp_path / "results" / "eval.json"
    assert evaluate_cli([run, "--data", data, "--device", "cpu", "--batch-size", "3", "--output", out]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["source"] == str(run / "checkpoints" / "step_00000002") and result["seq_len"] == 16
    assert result["documents"] == len(texts) and result["bytes"] == sum(len(t.encode("utf-8")) for t in texts)

    batches = source_windows([str(data)], tokenizer, seq_len=16, batch_size=5)
    direct = evaluate(model_logits(engine.module), TokenBytes(tokenizer), batches)
    assert result["tokens"] == direct.tokens
    assert result["bpb"] == pytest.approx(direct.bpb, rel=1e-6)
    assert result["loss"] == pytest.approx(direct.loss, rel=1e-6)

    # --max-tokens, --seq-len shorter than the model's
    assert evaluate_cli([run, "--data", data, "--device", "cpu", "--seq-len", "8", "--max-tokens", "50"]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["tokens"] == 50 and cut["seq_len"] == 8


def test_bad_input_exits_2_naming_it(tmp_path, tiny_run, tiny_dataset, speeches, capsys):
    from data_prep import train_tokenizer

    run, _ = tiny_run
    data = write_jsonl(tmp_path / "held_out.jsonl", TRICKY)

    def refused(*argv) -> str:
        assert evaluate_cli([*argv, "--device", "cpu"]) == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'missing.txt'}: no such file" in refused(run, "--data", tmp_path / "missing.txt")
    assert f"{tmp_path / 'nothing'}: not a directory" in refused(tmp_path / "nothing", "--data", data)
    assert "--seq-len: 32 is longer than the model's seq_len of 16" in refused(run, "--data", data, "--seq-len", 32)
    assert "has no 'test' shards" in refused(run, "--data", tiny_dataset, "--split", "test")
    other = tmp_path / "other"  # a tokenizer of the same vocab size, trained on other text
    argv = [str(speeches[100]), str(speeches[101]), "--output", str(other), "--vocab-size", "2000", "--quiet"]
    assert train_tokenizer.main(argv) == 0
    shards = tmp_path / "shards"
    from ..helpers import tokenize

    assert tokenize([data], shards, other.with_suffix(".model")) == 0
    assert f"{shards} was tokenized with {other.with_suffix('.model')}" in refused(run, "--data", shards)
