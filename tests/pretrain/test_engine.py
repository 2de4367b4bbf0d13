import json

import pytest

from pretrain.config import BatchPlan, ConfigError, ModelConfig, OptimConfig, TrainConfig
from pretrain.engine import build_ds_config, lr_at, param_groups
from pretrain.model import Transformer

from ..helpers import REPO


def optim(**kw):
    return OptimConfig(**{**dict(lr=1e-3, min_lr=1e-4, warmup_steps=10), **kw})


@pytest.mark.parametrize(
    "schedule,expected",
    [
        ("cosine", {0: 1e-4, 4: 5e-4, 9: 1e-3, 10: 1e-3, 60: 5.5e-4, 110: 1e-4, 500: 1e-4}),
        ("linear", {0: 1e-4, 9: 1e-3, 10: 1e-3, 35: 7.75e-4, 60: 5.5e-4, 110: 1e-4}),
        ("wsd", {0: 1e-4, 9: 1e-3, 10: 1e-3, 90: 1e-3, 100: 5.5e-4, 110: 1e-4, 111: 1e-4}),
        ("constant", {0: 1e-4, 9: 1e-3, 10: 1e-3, 110: 1e-3, 10_000: 1e-3}),
    ],
)
def test_lr_schedule_exact_values(schedule, expected):
    cfg = optim(schedule=schedule)
    for step, lr in expected.items():
        assert lr_at(step, cfg, total_steps=111) == pytest.approx(lr, rel=1e-12, abs=1e-15), step


def test_lr_decay_steps_and_no_warmup():
    cfg = optim(warmup_steps=0, decay_steps=50)
    assert lr_at(0, cfg, total_steps=1000) == 1e-3
    assert lr_at(50, cfg, total_steps=1000) == pytest.approx(1e-4)


def test_last_step_of_the_run_is_at_min_lr():
    for schedule in ("cosine", "linear", "wsd"):
        cfg = optim(schedule=schedule)
        assert lr_at(99, cfg, total_steps=100) == pytest.approx(1e-4)  # the last step trained
        assert lr_at(98, cfg, total_steps=100) > 1e-4


def test_total_steps_from_max_tokens():
    plan = BatchPlan(global_batch=8, micro_batch=8, world_size=1, seq_len=512)  # 4096 tokens per step
    assert plan.total_steps(TrainConfig(max_steps=100)) == 100
    assert plan.total_steps(TrainConfig(max_steps=100, max_tokens=40_960)) == 10
    assert plan.total_steps(TrainConfig(max_steps=100, max_tokens=40_961)) == 11
    assert plan.total_steps(TrainConfig(max_steps=5, max_tokens=10**9)) == 5


def plan_of(global_batch=8, world=1, micro=None, seq_len=16) -> BatchPlan:
    train = TrainConfig(global_batch_seqs=global_batch, micro_batch_seqs=micro or global_batch // world)
    return BatchPlan.resolve(train, seq_len=seq_len, world_size=world)


def ds_config(tmp_path, content: dict, *, global_batch=16, world=2, micro=4, precision="fp32"):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    plan = plan_of(global_batch, world, micro)
    return build_ds_config(path, optim=optim(grad_clip=0.5), plan=plan, precision=precision)


def test_derived_keys_are_injected(tmp_path):
    ds = ds_config(tmp_path, {"zero_optimization": {"stage": 2}, "train_batch_size": "auto"})
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert ds["optimizer"]["params"]["torch_adam"] is True  # on CPU
    assert ds["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize(
    "content,kw,message",
    [
        ({"train_batch_size": 32}, {}, "sets train_batch_size=32 but the run derives 16"),
        ({"gradient_accumulation_steps": 4}, {}, "sets gradient_accumulation_steps=4 but the run derives 2"),
        ({"gradient_clipping": 1.0}, {}, "sets gradient_clipping=1.0 but the run derives 0.5"),
        ({"bf16": {"enabled": True}}, {}, "sets bf16.enabled=True but train.precision is fp32"),
        ({"optimizer": {"type": "Adam"}}, {}, "sets 'optimizer'"),
        ({}, {"global_batch": 15}, "global batch of 15 sequences does not split into 2 rank"),
        ({}, {"global_batch": 16, "world": 3}, "make it a multiple of 12"),
        ({}, {"global_batch": 12, "micro": 4}, "make it a multiple of 8"),
    ],
)
def test_conflicts_and_bad_batch_arithmetic(tmp_path, content, kw, message):
    with pytest.raises(ConfigError, match=message):
        ds_config(tmp_path, content, **kw)


def test_missing_or_broken_ds_config(tmp_path):
    with pytest.raises(ConfigError, match="train.ds_config: .*nope.json not found"):
        build_ds_config(tmp_path / "nope.json", optim=optim(), plan=plan_of(8), precision="fp32")
    (tmp_path / "bad.json").write_text("{stage: 1")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        build_ds_config(tmp_path / "bad.json", optim=optim(), plan=plan_of(8), precision="fp32")


def test_without_zero_the_engine_clips(tmp_path):
    ds = ds_config(tmp_path, {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.5})
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed must not clip a second time


def test_cpu_allocator_tuning_applies():
    from pretrain.engine import tune_cpu_allocator

    assert tune_cpu_allocator() is True  # glibc here


def test_shipped_ds_configs_build():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = build_ds_config(path, optim=optim(), plan=plan_of(8, world=2, micro=2), precision="bf16")
        assert ds["bf16"]["enabled"] and ds["gradient_accumulation_steps"] == 2, path.name


def test_weight_decay_groups():
    m = Transformer(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=8))
    decay, no_decay = param_groups(m, optim())
    names = {id(p): n for n, p in m.named_parameters()}
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(
        ["tok_embeddings.weight", "output.weight", "norm.weight"]
        + [f"layers.{i}.{n}_norm.weight" for i in range(2) for n in ("attention", "ffn")]
    )
    assert all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 8
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    with_embed = param_groups(m, optim(decay_embeddings=True))
    assert len(with_embed[0]["params"]) == 10


@pytest.mark.parametrize("stage", [0, 2])
def test_non_finite_step_is_not_applied(world, ds_json, stage):
    """A step whose loss or gradients are not finite leaves the weights and the optimizer state as they were;
    the next finite step updates them."""
    import torch

    from ..helpers import random_batches, tiny_engine

    engine = tiny_engine(ds_json(stage))
    inner = engine.optimizer if stage == 0 else engine.optimizer.optimizer

    def snapshot():
        state = [v.clone() for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        return [p.detach().clone() for p in engine.module.parameters()], state

    assert engine.train_step(random_batches(0), 1e-3).applied
    before = snapshot()
    hook = engine.module.output.register_forward_hook(lambda m, i, o: o * float("nan"))
    stats = engine.train_step(random_batches(10), 1e-3)
    hook.remove()
    after = snapshot()
    assert not stats.applied, stats
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "weights changed"
    assert len(before[1]) == len(after[1]) > 0 and all(torch.equal(a, b) for a, b in zip(before[1], after[1]))
    assert engine.train_step(random_batches(20), 1e-3).applied
    assert not all(torch.equal(a, p) for a, p in zip(before[0], engine.module.parameters()))


def test_z_loss_is_added_to_the_loss_and_reported_apart(world, ds_json):
    import torch

    from pretrain.config import ModelConfig, OptimConfig, TrainConfig
    from pretrain.engine import Engine

    from ..helpers import random_batches

    def engine(z):
        train = TrainConfig(ds_config=ds_json(0), micro_batch_seqs=2, global_batch_seqs=4)
        e = Engine(OptimConfig(lr=1e-2, warmup_steps=0, z_loss=z), train, plan_of(global_batch=4, micro=2))
        e.build(ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16), seed=0)
        return e

    plain, z = engine(0.0), engine(1e-2)
    batches = random_batches(0)
    with torch.no_grad():
        lse = [torch.logsumexp(z.module(b[:, :-1]).float(), dim=-1).pow(2).mean() for b in batches]
    a, b = plain.train_step(batches, 1e-2), z.train_step(batches, 1e-2)
    assert a.z_loss is None
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)  # the loss reported is the cross-entropy
    assert b.z_loss.item() == pytest.approx(1e-2 * sum(lse).item() / 2, rel=1e-5)
    assert not all(torch.equal(p, q) for p, q in zip(plain.module.parameters(), z.module.parameters()))


@pytest.mark.parametrize("stage", [1, 3])
def test_starting_weights_reach_the_fp32_master_weights_under_bf16(world, ds_json, stage):
    """train.init_from under bf16: the module holds bf16 copies, but DeepSpeed's fp32 master weights (what training
    updates and checkpoints save) get the starting weights exactly, not their bf16 rounding."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    from pretrain.engine import Engine

    model_cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16)
    source = Transformer(model_cfg)
    source.init_weights(5)
    g = torch.Generator().manual_seed(0)
    weights = {k: v + 1e-4 * torch.randn(v.shape, generator=g) for k, v in source.state_dict().items()}
    train = TrainConfig(ds_config=ds_json(stage), micro_batch_seqs=2, global_batch_seqs=2, precision="bf16")
    engine = Engine(optim(warmup_steps=0), train, BatchPlan.resolve(train, seq_len=16, world_size=1))
    engine.build(model_cfg, seed=0, weights=weights)
    for name, p in engine.ds.module.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(safe_get_full_fp32_param(p).cpu(), weights[name]), name
