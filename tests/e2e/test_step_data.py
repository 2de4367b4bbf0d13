"""Step to data (launch/inspect_step.py) and data.skip_samples, on real training runs (1 rank, accumulating 2)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ..helpers import REPO, losses, pretrain, tiny_overrides

G = 4  # global batch, in sequences


def args(tokenizer_path, dataset, run_dir, *extra):
    return tiny_overrides(tokenizer_path, dataset, run_dir) + [
        f"train.global_batch_seqs={G}",
        "train.micro_batch_seqs=2",
        "train.eval_every=0",
        "logging.log_every=1",
        "checkpoint.save_every=1",
        "checkpoint.keep_last=10",
        *extra,
    ]


def inspect_step(run_dir, step, *extra):
    cmd = [sys.executable, str(REPO / "launch/inspect_step.py"), str(run_dir), str(step), *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_printed_batch_is_the_one_the_step_trained_on(tmp_path, tokenizer_path, tiny_dataset):
    from pretrain.inference import load_model

    run_dir = tmp_path / "run"
    result = pretrain("python", 1, args(tokenizer_path, tiny_dataset, run_dir, "train.max_steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    logged = dict(losses(run_dir))
    for step in (2, 4):
        out = tmp_path / f"step{step}.jsonl"
        shown = inspect_step(run_dir, step, "--output", out)
        assert shown.returncode == 0, shown.stderr
        samples = [json.loads(line) for line in out.read_text().splitlines()]
        assert [s["slot"] for s in samples] == [s["sample"] for s in samples] == list(range((step - 1) * G, step * G))
        assert f"step {step}: {G} samples, global sample numbers {(step - 1) * G}..{step * G - 1}" in shown.stdout
        for s in samples:  # the documents' parts add up to the window, their text is printed
            assert sum(b - a for a, b in (d["tokens"] for d in s["documents"])) == len(s["ids"]) == 33
            assert s["tokens"][1] - s["tokens"][0] == 33 and s["dataset"].endswith(":train")
            assert any(d["text"].strip() for d in s["documents"])
            assert json.dumps(s["documents"][0]["text"][:20], ensure_ascii=False)[:-1] in shown.stdout
        # the model before the step, on these tokens, has the loss the step logged
        model = load_model(run_dir, tag=f"step_{step - 1:08d}").model
        ids = torch.tensor([s["ids"] for s in samples])
        with torch.no_grad():
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
        assert loss == pytest.approx(logged[step], rel=1e-5), step


def test_a_resumed_run_that_skips_samples_equals_a_fresh_run_with_the_same_skip(tmp_path, tokenizer_path, tiny_dataset):
    skips = [[3 * G + 1, 3 * G + 3], [4 * G, 4 * G + 1]]  # inside steps 4 and 5
    skip = f"data.skip_samples={skips}"
    fresh = tmp_path / "fresh"
    result = pretrain("python", 1, args(tokenizer_path, tiny_dataset, fresh, "train.max_steps=6", skip))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"  # 3 steps without the skip, then 3 more with it
    first = pretrain(
        "python", 1, args(tokenizer_path, tiny_dataset, resumed, "train.max_steps=6", "train.stop_at_step=3")
    )
    assert first.returncode == 3, first.stderr[-3000:]
    second = pretrain("python", 1, args(tokenizer_path, tiny_dataset, resumed, "train.max_steps=6", skip))
    assert second.returncode == 0, second.stderr[-3000:]
    assert dict(losses(resumed)) == dict(losses(fresh))  # steps 1-6, exactly
    shown = inspect_step(resumed, 4, "--output", tmp_path / "s.jsonl")
    numbers = [json.loads(line)["sample"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert numbers == [3 * G, 3 * G + 3, 4 * G + 1, 4 * G + 2] and "(some skipped between)" in shown.stdout
    meta = json.loads((resumed / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["config"]["data"]["skip_samples"] == skips  # recorded

    plain = tmp_path / "plain"  # without the skip: step 4 trains on other samples
    assert pretrain("python", 1, args(tokenizer_path, tiny_dataset, plain, "train.max_steps=4")).returncode == 0
    assert dict(losses(plain))[3] == dict(losses(fresh))[3] and dict(losses(plain))[4] != dict(losses(fresh))[4]
    # skipping what a run already trained on is refused, naming it, and trains nothing
    again = pretrain("python", 1, args(tokenizer_path, tiny_dataset, plain, "train.max_steps=6", skip))
    assert again.returncode == 2
    assert f"data.skip_samples {skips} changes samples this run already trained on (up to global sample " \
           f"{4 * G - 1}, {4 * G} samples by step 4" in again.stderr  # fmt: skip
    assert len(losses(plain)) == 4
