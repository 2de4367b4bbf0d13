"""End-to-end training runs in real processes: 1 rank, and 2 ranks (gloo) under deepspeed and torchrun."""

import pytest

from ..helpers import pretrain, read_metrics, tiny_overrides

STEPS = 8
SCALARS = [
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "perf/tokens_per_sec",
    "perf/tflops_per_device",
    "perf/mfu",
    "perf/step_time",
    "perf/memory_gib",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path, tiny_dataset):
    """The same 8 steps, global batch 8: 1 rank accumulating 2 micro-batches (ZeRO-1, ZeRO-0), and 2 ranks
    without accumulation under ZeRO-2 (deepspeed launcher) and ZeRO-3 (torchrun)."""
    root = tmp_path_factory.mktemp("runs")
    common = [
        "train.global_batch_seqs=8",
        "train.micro_batch_seqs=4",
        f"train.max_steps={STEPS}",
        "train.eval_every=4",
        "train.eval_batches=2",
        "logging.log_every=1",
        "optim.grad_clip=0.05",  # small enough to clip at every step: the clipping paths are compared too
    ]
    setups = {
        "ref": ("python", 1, "zero1"),
        "zero0": ("python", 1, "zero0"),
        "zero2_offload": ("python", 1, "zero2_offload"),  # DeepSpeed's CPU Adam (a C++ op built on first use)
        "zero2": ("deepspeed", 2, "zero2"),
        "zero3": ("torchrun", 2, "zero3"),
    }
    out = {}
    for name, (kind, nproc, ds) in setups.items():
        run_dir = root / name
        args = (
            tiny_overrides(tokenizer_path, tiny_dataset, run_dir) + common + [f"train.ds_config=ds_configs/{ds}.json"]
        )
        result = pretrain(kind, nproc, args)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        out[name] = (run_dir, result)
    return out


def by_step(run_dir, key):
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


@pytest.mark.parametrize("name", ["zero0", "zero2_offload", "zero2", "zero3"])
def test_runs_match_step_for_step(runs, name):
    """ZeRO-0 and ZeRO-2 with optimizer offload on 1 rank, ZeRO-2 and ZeRO-3 on 2 ranks: all match the 1-rank
    ZeRO-1 run (accumulation 2)."""
    ref_loss = by_step(runs["ref"][0], "train/loss")
    loss = by_step(runs[name][0], "train/loss")
    assert sorted(loss) == sorted(ref_loss) == list(range(1, STEPS + 1))
    for step in ref_loss:
        assert loss[step] == pytest.approx(ref_loss[step], rel=1e-5), step
    for key in ("train/grad_norm", "eval/loss"):
        ref, got = by_step(runs["ref"][0], key), by_step(runs[name][0], key)
        assert sorted(got) == sorted(ref) and all(got[s] == pytest.approx(ref[s], rel=1e-4) for s in ref), key
    assert ref_loss[STEPS] < ref_loss[1] - 0.5  # and it learns
    assert min(by_step(runs["ref"][0], "train/grad_norm").values()) > 0.05  # so every step was clipped


def test_run_dir_holds_resolved_config_and_ds_json(runs):
    import json

    import yaml

    run_dir, result = runs["zero3"]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["vocab_size"] == 2000 and cfg["train"]["max_steps"] == STEPS
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert (
        ds["zero_optimization"]["stage"] == 3 and ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 8
    )
    assert "2 rank(s) on cpu, ZeRO 3, fp32" in result.stderr
    assert f"step {STEPS}/{STEPS} | loss" in result.stderr


def test_tensorboard_has_every_scalar_at_every_logged_step(runs):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS as KIND
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

    run_dir = runs["ref"][0]
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={KIND: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in SCALARS:
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, STEPS + 1)), tag
    for tag in ("eval/loss", "eval/ppl"):
        assert [e.step for e in acc.Scalars(tag)] == [4, 8], tag
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx(by_step(run_dir, "train/loss"), rel=1e-6)
    ppl = acc.Scalars("eval/ppl")[-1].value
    assert ppl == pytest.approx(2.718281828 ** acc.Scalars("eval/loss")[-1].value, rel=1e-5)
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] == pytest.approx(5e-3) and lr[1] == pytest.approx(1e-2)  # warmup of 2 steps to 1e-2
    assert all(0 < e.value < 1 for e in acc.Scalars("perf/mfu"))
    assert "config/text_summary" in acc.Tags()["tensors"] and "train/tokens_seen" in tags


def test_bad_config_key_exits_2_naming_it(tmp_path, tokenizer_path, tiny_dataset):
    args = tiny_overrides(tokenizer_path, tiny_dataset, tmp_path / "r") + [
        "train.global_batch_seqs=8",
        "model.n_layer=3",
    ]
    result = pretrain("python", 1, args)
    assert result.returncode == 2
    assert "model.n_layer: unknown key (did you mean n_layers?)" in result.stderr


def test_reused_run_dir_and_broken_tokenizer_exit_2(tmp_path, runs, tokenizer_path, tiny_dataset):
    args = tiny_overrides(tokenizer_path, tiny_dataset, runs["ref"][0]) + ["train.global_batch_seqs=8"]
    result = pretrain("python", 1, [*args, "checkpoint.resume=none"])
    assert result.returncode == 2 and "checkpoint.resume: none, but" in result.stderr
    assert "holds checkpoints of an earlier run" in result.stderr
    (tmp_path / "broken.model").write_bytes(b"not a model")
    args = tiny_overrides(tmp_path / "broken.model", tiny_dataset, tmp_path / "r") + ["train.global_batch_seqs=8"]
    result = pretrain("python", 1, args)
    assert (
        result.returncode == 2 and "data.tokenizer: " in result.stderr and "not a sentencepiece model" in result.stderr
    )


def test_missing_shards_and_wrong_tokenizer_exit_2(tmp_path, tokenizer_path, tiny_dataset, speeches):
    args = tiny_overrides(tokenizer_path, tmp_path / "no_such_data", tmp_path / "r") + ["train.global_batch_seqs=8"]
    result = pretrain("python", 1, args)
    assert (
        result.returncode == 2 and "data.datasets[0]: " in result.stderr and "no_such_data is neither" in result.stderr
    )

    from data_prep import train_tokenizer

    other = tmp_path / "other"
    assert train_tokenizer.main([str(speeches[0]), "--output", str(other), "--vocab-size", "400", "--quiet"]) == 0
    args = tiny_overrides(other.with_suffix(".model"), tiny_dataset, tmp_path / "r") + ["train.global_batch_seqs=8"]
    result = pretrain("python", 1, args)
    assert (
        result.returncode == 2
        and "was tokenized with" in result.stderr
        and "re-tokenize or fix data.tokenizer" in result.stderr
    )


def test_an_io_error_is_not_a_bad_configuration(tmp_path, tokenizer_path, tiny_dataset):
    """An operating-system error during a run (here the metrics file is a directory) exits 1 with a one-line I/O
    error, not 2 ("bad configuration"): exit statuses mean what the README says."""
    run = tmp_path / "r"
    (run / "metrics.jsonl").mkdir(parents=True)
    result = pretrain("python", 1, tiny_overrides(tokenizer_path, tiny_dataset, run) + ["train.global_batch_seqs=8"])
    assert result.returncode == 1 and "error: rank 0: I/O error: " in result.stderr, result.stderr[-2000:]
    assert "metrics.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_token_found_by_rank_1_is_reported_by_rank_1(tmp_path, tokenizer_path, tiny_dataset, tokenizer):
    """A token id outside the vocab (a shard changed behind its manifest's back) in a sample only rank 1 reads stops
    every rank before the model sees it (no rank left waiting in a collective); rank 1 names it, rank 0 says so."""
    import shutil

    import numpy as np

    from pretrain.config import BatchPlan, DataConfig, DatasetSpec, TrainConfig
    from pretrain.data import blend, build_dataset
    from pretrain.shards import IndexedShard, shard_file

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    plan = BatchPlan.resolve(TrainConfig(global_batch_seqs=8, micro_batch_seqs=4), seq_len=32, world_size=2)
    # the order the run reads: its data.seed
    train = build_dataset(
        [DatasetSpec(str(data))], "train", seq_len=32, seed=DataConfig().seed, tokenizer=tokenizer.describe(), key="d"
    )
    start, _ = plan.rank_range(0, 1)  # rank 1's first sample of step 0 ...
    (d,), (k,) = blend(train.weights, start, 1)
    position = train.datasets[d].window_of(int(k)) * 32 + 5  # ... its 6th token
    stream = train.datasets[d].stream
    i, offset = stream.shard_at(position)
    shard = IndexedShard(stream.shards[i].prefix)
    with open(shard_file(shard.prefix, ".bin"), "r+b") as f:
        f.seek(offset * shard.dtype.itemsize)
        f.write(np.array([tokenizer.vocab_size + 7], dtype=shard.dtype).tobytes())
    args = tiny_overrides(tokenizer_path, data, tmp_path / "r") + ["train.global_batch_seqs=8", "train.max_steps=2"]
    result = pretrain("torchrun", 2, [*args, "train.micro_batch_seqs=4", "train.eval_every=0"])
    assert result.returncode != 0, result.stderr[-3000:]
    assert f"error: rank 1: {data}:train, sample {start}: token 5 is {tokenizer.vocab_size + 7}, outside the vocab" in (
        result.stderr
    ), result.stderr[-3000:]
    assert "error: another rank read a sample it cannot train on in the batch of step 1" in result.stderr
    assert "IndexError" not in result.stderr and "]: Traceback" not in result.stderr  # no rank's traceback
    # torchrun's report: rank 1 exited 2 (rank 0, which stops with 2 as well, may be SIGTERMed by torchrun first)
    assert "exitcode  : 2 " in result.stderr, result.stderr[-3000:]
