"""Non-finite loss or gradients: the update is skipped (weights and optimizer state untouched), and a run stops
after train.max_bad_steps consecutive such steps, its last good checkpoint intact."""

import subprocess
import sys

import pytest

from pretrain import checkpoint

from .conftest import REPO, tiny_overrides
from .test_checkpoint import launch

PROBE = r"""
import json, os, sys, tempfile, torch
sys.path.insert(0, {repo!r})
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed
deepspeed.init_distributed(verbose=False)
from pretrain.config import ModelConfig, OptimConfig, TrainConfig
from pretrain.engine import Engine
from pretrain.model import Transformer
stage = int(sys.argv[1])
ds_json = os.path.join(tempfile.mkdtemp(), "ds.json")
json.dump({{"zero_optimization": {{"stage": stage}}}}, open(ds_json, "w"))
engine = Engine(OptimConfig(lr=1e-3, warmup_steps=0), TrainConfig(ds_config=ds_json, micro_batch_seqs=2, global_batch_seqs=4), global_batch=4)
model = Transformer(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16))
model.init_weights(0)
engine.initialize(model)
batch = lambda seed: [torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(seed + i)) for i in range(2)]
inner = engine.optimizer if stage == 0 else engine.optimizer.optimizer
def snapshot():
    state = [v.clone() for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return [p.detach().clone() for p in engine.module.parameters()], state
assert engine.train_step(batch(0), 1e-3).applied
before = snapshot()
hook = engine.module.output.register_forward_hook(lambda m, i, o: o * float("nan"))
stats = engine.train_step(batch(10), 1e-3)
hook.remove()
after = snapshot()
assert not stats.applied, stats
assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "weights changed"
assert len(before[1]) == len(after[1]) > 0 and all(torch.equal(a, b) for a, b in zip(before[1], after[1])), "optimizer state changed"
stats = engine.train_step(batch(20), 1e-3)
assert stats.applied
assert not all(torch.equal(a, p) for a, p in zip(before[0], engine.module.parameters()))
print("PROBE OK")
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_step_is_not_applied(stage):
    from .test_training import free_port

    code = PROBE.format(repo=str(REPO))
    r = subprocess.run(
        [sys.executable, "-c", code, str(stage), str(free_port())], capture_output=True, text=True, timeout=300
    )
    assert "PROBE OK" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


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
    r = launch("python", 1, args)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "step 2: non-finite loss or gradients" in r.stderr and "global samples [4, 8)" in r.stderr
    assert "3 consecutive steps with non-finite loss or gradients (train.max_bad_steps), the last at step 4" in r.stderr
    tag = (run / "checkpoints" / "latest").read_text()
    assert checkpoint.validate(run / "checkpoints", tag) is None and checkpoint.step_of(tag) == 1
