"""Non-finite loss or gradients in a real run: it stops after train.max_bad_steps consecutive skipped steps,
its last good checkpoint intact. (That a skipped step changes nothing is tests/pretrain/test_engine.py's.)"""

from pretrain import checkpoint

from ..helpers import pretrain, tiny_overrides


def test_run_stops_after_consecutive_bad_steps(tmp_path, tokenizer_path, tiny_dataset):
    run = tmp_path / "run"
    args = tiny_overrides(tokenizer_path, tiny_dataset, run) + [
        "train.global_batch_seqs=4",
        "train.max_steps=50",
        "train.eval_every=0",
        "optim.warmup_steps=0",
        "optim.lr=1e30",  # the first update throws the weights to ~1e30: every later forward overflows
        "optim.min_lr=0",
        "optim.grad_clip=0",
        "train.max_bad_steps=3",
        "checkpoint.save_every=1",
    ]
    r = pretrain("python", 1, args)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "step 2: non-finite loss or gradients" in r.stderr and "global samples [4, 8)" in r.stderr
    assert "3 consecutive steps with non-finite loss or gradients (train.max_bad_steps), the last at step 4" in r.stderr
    tag = (run / "checkpoints" / "latest").read_text()
    assert checkpoint.validate(run / "checkpoints", tag) is None and checkpoint.step_of(tag) == 1
