"""Checkpoints in this process: the record / validation / pruning mechanics, and the CheckpointManager's policy
(find, check, load, save) with a real engine on a process group of one."""

import dataclasses
import json
import logging
import pickle

import numpy as np
import pytest
import torch

from pretrain import checkpoint
from pretrain.checkpoint import CheckpointError, CheckpointManager, CheckpointMeta
from pretrain.config import CheckpointConfig, ModelConfig, to_dict

from ..helpers import fake_checkpoint, random_batches, record, tiny_engine


# ----------------------------------------------------------------------------------------------- mechanics
def test_validation_names_the_problem(tmp_path):
    d = fake_checkpoint(tmp_path, 5)
    assert checkpoint.validate(tmp_path, "step_00000005") is None
    (d / "data.pt").write_bytes(b"x" * 9)
    assert "9 bytes, recorded 10" in checkpoint.validate(tmp_path, "step_00000005")
    (d / "data.pt").write_bytes(b"y" * 10)
    assert "CRC-32 differs" in checkpoint.validate(tmp_path, "step_00000005")
    assert checkpoint.validate(tmp_path, "step_00000005", checksums=False) is None
    (d / "data.pt").unlink()
    assert "data.pt: missing" in checkpoint.validate(tmp_path, "step_00000005")
    fake_checkpoint(tmp_path, 7, complete=False)
    assert "no complete.json" in checkpoint.validate(tmp_path, "step_00000007")


@pytest.mark.parametrize("record", [b"\x8f\x00 random bytes", b"[]", b'{"files": {"data.pt": {}}}', b'{"files": []}'])
def test_a_damaged_record_makes_the_checkpoint_invalid(tmp_path, record):
    d = fake_checkpoint(tmp_path, 5)
    (d / checkpoint.RECORD).write_bytes(record)
    assert "complete.json: unreadable" in checkpoint.validate(tmp_path, "step_00000005")
    assert checkpoint.newest_valid(tmp_path) is None


def test_a_record_must_list_the_meta_and_stay_inside(tmp_path):
    d = fake_checkpoint(tmp_path, 5)
    (d / checkpoint.RECORD).write_text(json.dumps({"files": {}}))
    assert "does not list meta.json" in checkpoint.validate(tmp_path, "step_00000005")
    outside = {checkpoint.META: {"bytes": 2}, "../../../etc/hostname": {"bytes": 1}}
    (d / checkpoint.RECORD).write_text(json.dumps({"files": outside}))
    assert "lists files outside the checkpoint (../../../etc/hostname)" in checkpoint.validate(tmp_path, d.name)


def test_newest_valid_skips_broken_ones(tmp_path, caplog):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)
    (fake_checkpoint(tmp_path, 8) / "data.pt").write_bytes(b"x")
    assert checkpoint.newest_valid(tmp_path) == "step_00000004"
    assert "skipping checkpoint step_00000008" in caplog.text and "skipping checkpoint step_00000006" in caplog.text


def test_prune_keeps_last_k_every_m_and_never_the_only_valid_one(tmp_path):
    for s in range(1, 11):
        fake_checkpoint(tmp_path, s, complete=s != 7)
    fake_checkpoint(tmp_path, 12, complete=False)  # newer than the protected one: being written, keep
    checkpoint.prune(tmp_path, keep_last=2, keep_every=4, protect="step_00000010")
    left = sorted(c.step for c in checkpoint.list_checkpoints(tmp_path))
    assert left == [4, 8, 9, 10, 12]  # 9, 10 (last two), 4 and 8 (every 4th); the incomplete 7 is gone
    only = tmp_path / "only"
    fake_checkpoint(only, 3)
    checkpoint.prune(only, keep_last=1, keep_every=0, protect="step_00000003")
    assert [c.step for c in checkpoint.list_checkpoints(only)] == [3]


# ----------------------------------------------------------------------------------------------- manager
MODEL = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16)
FINGERPRINT = {"datasets": [{"path": "data", "weight": 1.0, "content": "abc"}], "seq_len": 16, "seed": 0}


def run_meta(*, model=MODEL, global_batch=4, world_size=1, zero_stage=1, fingerprint=FINGERPRINT) -> CheckpointMeta:
    config = {"model": to_dict(model), "train": {"seed": 0}}
    return CheckpointMeta.of_run(
        global_batch=global_batch,
        world_size=world_size,
        zero_stage=zero_stage,
        config=config,
        data_fingerprint=fingerprint,
    )


def manager(tmp_path, world, engine=None, run=None, **cfg) -> CheckpointManager:
    return CheckpointManager(
        tmp_path / "checkpoints", CheckpointConfig(**cfg), engine=engine, world=world, run=run or run_meta()
    )


def weights(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.module.parameters()]


def test_manager_saves_finds_and_loads_exactly(tmp_path, world, ds_json):
    a = tiny_engine(ds_json(1), seed=0, **to_dict(MODEL))
    for i in range(2):
        a.train_step(random_batches(i), 1e-3)
    tag, removed = manager(tmp_path, world, a).save(2)
    assert tag == "step_00000002" and removed == []
    assert checkpoint.validate(tmp_path / "checkpoints", tag) is None
    meta = checkpoint.read_meta(tmp_path / "checkpoints", tag)
    assert (meta.step, meta.consumed_samples, meta.tokens_seen) == (2, 8, 8 * 16)

    b = tiny_engine(ds_json(1), seed=1, **to_dict(MODEL))  # other weights until loaded
    m = manager(tmp_path, world, b)
    point = m.find()
    assert point.tag == tag and point.universal is False and point.meta == meta
    assert m.load(point) == 2
    assert all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))
    la = a.train_step(random_batches(5), 1e-3).loss  # the optimizer state came back too
    lb = b.train_step(random_batches(5), 1e-3).loss
    assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(weights(a), weights(b)))


def test_manager_retention_and_latest(tmp_path, world, ds_json):
    engine = tiny_engine(ds_json(0), **to_dict(MODEL))
    m = manager(tmp_path, world, engine, keep_last=2)
    assert m.latest() is None
    removed = [m.save(step)[1] for step in (1, 2, 3)]
    assert removed == [[], [], ["step_00000001"]]
    assert [c.tag for c in checkpoint.list_checkpoints(m.dir)] == ["step_00000003", "step_00000002"]
    assert m.latest() == m.dir / "step_00000003"


@pytest.mark.parametrize(
    "change,message",
    [
        (
            dict(model=dataclasses.replace(MODEL, d_model=64)),
            "the model differs from the checkpoint's: model.d_model: 32 -> 64",
        ),
        (dict(global_batch=8), "trained with a global batch of 4 sequences, this run has 8"),
        (dict(fingerprint={**FINGERPRINT, "seed": 1}), "the training data differs from the checkpoint's"),
        (dict(zero_stage=3), "saved with ZeRO-1, this run uses ZeRO-3; moving between ZeRO-3"),
        (dict(zero_stage=0), "saved with ZeRO-1, this run uses ZeRO-0; moving between no ZeRO and ZeRO"),
    ],
)
def test_check_names_what_differs(tmp_path, world, change, message):
    saved = run_meta().at(10)
    with pytest.raises(CheckpointError, match=message):
        manager(tmp_path, world, run=run_meta(**change)).check(tmp_path / "step_00000010", saved)


def test_check_allows_what_may_change(tmp_path, world):
    saved = run_meta().at(10)
    m = manager(tmp_path, world, run=run_meta(fingerprint={}), allow_data_change=True)
    m.check(tmp_path, saved)  # new data, deliberately
    m = manager(tmp_path, world, run=run_meta(model=dataclasses.replace(MODEL, activation_checkpointing=True)))
    m.check(tmp_path, saved)
    manager(tmp_path, world, run=run_meta(zero_stage=2)).check(tmp_path, saved)  # ZeRO-1 -> 2
    manager(tmp_path, world, run=run_meta(world_size=3)).check(tmp_path, saved)  # any number of ranks
    older = dataclasses.replace(saved, config={**saved.config, "model": dict(saved.config["model"])})
    del older.config["model"]["document_masking"]  # saved before the key existed: its default, the same model
    manager(tmp_path, world).check(tmp_path, older)
    masked = dataclasses.replace(MODEL, document_masking=True, eod_id=2)
    with pytest.raises(CheckpointError, match="model.document_masking: False -> True"):
        manager(tmp_path, world, run=run_meta(model=masked)).check(tmp_path, older)


def test_find_decides_on_the_universal_format(tmp_path, world, ds_json):
    engine = tiny_engine(ds_json(1), **to_dict(MODEL))
    manager(tmp_path, world, engine).save(3)
    assert manager(tmp_path, world).find().universal is False
    assert manager(tmp_path, world, run=run_meta(zero_stage=2)).find().universal is True  # another stage
    wider = dataclasses.replace(run_meta(), world_size=2)  # as if this run had 2 ranks
    assert manager(tmp_path, world, run=wider).find().universal is True


def test_find_follows_checkpoint_resume(tmp_path, world, ds_json, caplog):
    engine = tiny_engine(ds_json(0), **to_dict(MODEL))
    m = manager(tmp_path, world, engine)
    for step in (1, 2):
        m.save(step)
    assert manager(tmp_path, world, resume="step_00000001").find().tag == "step_00000001"
    assert manager(tmp_path, world, resume=str(m.dir / "step_00000001")).find().tag == "step_00000001"
    assert manager(tmp_path, world, resume=str(m.dir)).find().tag == "step_00000002"
    with pytest.raises(CheckpointError, match="checkpoint.resume: none, but .* holds checkpoints of an earlier run"):
        manager(tmp_path, world, resume="none").find()
    assert manager(tmp_path / "elsewhere", world, resume="none").find() is None
    with pytest.raises(CheckpointError, match="checkpoint.resume: .*step_00000007.* no complete.json"):
        manager(tmp_path, world, resume="step_00000007").find()
    (m.dir / "step_00000002" / checkpoint.META).write_text("{}")  # damaged after its record: skipped
    with caplog.at_level(logging.WARNING):
        assert manager(tmp_path, world).find().tag == "step_00000001"
    assert "skipping checkpoint step_00000002" in caplog.text


def test_load_of_files_gone_meanwhile_names_the_checkpoint(tmp_path, world, ds_json):
    """A checkpoint removed between finding and loading it (another job's retention) is an error naming it."""
    engine = tiny_engine(ds_json(1), **to_dict(MODEL))
    m = manager(tmp_path, world, engine)
    m.save(1)
    point = m.find()
    for f in point.path.glob("*optim_states.pt"):
        f.unlink()
    with pytest.raises(CheckpointError, match="step_00000001: DeepSpeed could not load it"):
        m.load(point)


# ----------------------------------------------------------------------------------------------- damaged runs
def test_a_run_whose_checkpoints_are_all_invalid_is_refused(tmp_path, world, ds_json):
    """Resuming a run directory whose every checkpoint is invalid stops with each one and its problem named, and
    touches nothing; it does not start again from step 0 over the earlier run."""
    m = manager(tmp_path, world, tiny_engine(ds_json(0), **to_dict(MODEL)))
    for step in (1, 2):
        m.save(step)
    (m.dir / "step_00000001" / checkpoint.RECORD).unlink()
    (m.dir / "step_00000002" / checkpoint.RECORD).write_bytes(b"\x00\x8f")
    before = sorted((p.relative_to(m.dir), p.stat().st_size) for p in m.dir.rglob("*"))
    with pytest.raises(CheckpointError) as e:
        manager(tmp_path, world).find()
    message = str(e.value)
    assert "holds no valid checkpoint, but a run saved here before (`latest` names step_00000002)" in message
    assert "step_00000001: " in message and "no complete.json" in message
    assert "step_00000002: " in message and "complete.json: unreadable" in message
    assert "launch/checkpoints.py set-aside" in message
    assert sorted((p.relative_to(m.dir), p.stat().st_size) for p in m.dir.rglob("*")) == before


def test_leftovers_of_an_unfinished_first_save_start_fresh(tmp_path, world, caplog):
    """The one case where no valid checkpoint means step 0: no save ever finished (no record, no `latest`), as a
    run killed during its first save leaves."""
    fake_checkpoint(tmp_path / "checkpoints", 2, complete=False)
    with caplog.at_level(logging.WARNING):
        assert manager(tmp_path, world).find() is None
    assert "step_00000002 left by a first save that never finished; starting from step 0" in caplog.text
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_bytes(b"step_00000002")  # but a save did finish once
    with pytest.raises(CheckpointError, match="holds no valid checkpoint"):
        manager(tmp_path, world).find()


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("target", ["rng_rank_0.pt", "mp_rank_00_model_states.pt"])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, world, ds_json, target):
    """A pickle planted in a checkpoint (its record fixed to match) is refused before anything is unpickled: ours
    (RNG states) and DeepSpeed's alike."""
    m = manager(tmp_path, world, tiny_engine(ds_json(0), **to_dict(MODEL)))
    m.save(1)
    marker = tmp_path / "code-ran"
    d = m.dir / "step_00000001"
    if target.startswith("rng"):
        state = checkpoint.read_rng(m.dir, "step_00000001", 0)
        torch.save({**state, "python": RunsCode(marker)}, d / target)
    else:
        state = torch.load(d / target, weights_only=True)
        torch.save({**state, "module": RunsCode(marker)}, d / target)
    record(d)
    assert checkpoint.validate(m.dir, "step_00000001") is None  # the record matches: only the scan can tell
    with pytest.raises(CheckpointError, match=f"{target}: refusing to unpickle it: loading would call posix.system"):
        manager(tmp_path, world).find()
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        checkpoint.consolidate(m.dir, "step_00000001")
    if target.startswith("rng"):
        with pytest.raises(CheckpointError, match="not an RNG state this project wrote"):
            checkpoint.read_rng(m.dir, "step_00000001", 0)
    assert not marker.exists()


def test_a_plain_pickle_is_refused(tmp_path, world, ds_json):
    """A file that is not torch.save's zip (a bare pickle) cannot be scanned, so it is refused too."""
    import pickle

    m = manager(tmp_path, world, tiny_engine(ds_json(0), **to_dict(MODEL)))
    m.save(1)
    d = m.dir / "step_00000001"
    (d / "rng_rank_0.pt").write_bytes(pickle.dumps(RunsCode(tmp_path / "code-ran")))
    record(d)
    with pytest.raises(CheckpointError, match="rng_rank_0.pt: refusing to unpickle it: not a file torch.save wrote"):
        manager(tmp_path, world).find()
    assert not (tmp_path / "code-ran").exists()


def test_what_our_saves_hold_passes_the_scan(tmp_path, world, ds_json):
    """Every file a save of each ZeRO stage writes (DeepSpeed's and ours) passes; the RNG states load with
    weights_only=True and restore the generators exactly."""
    import random

    import numpy as np

    for stage in (0, 1, 2, 3):
        m = manager(tmp_path / f"zero{stage}", world, tiny_engine(ds_json(stage), **to_dict(MODEL)))
        m.save(1)
        checkpoint.check_pickles(m.dir / "step_00000001")
    expected = (random.random(), np.random.random(), torch.rand(1))
    checkpoint.set_rng_state(checkpoint.read_rng(m.dir, "step_00000001", 0))
    assert (random.random(), np.random.random()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_loads_are_restricted_even_where_full_unpickling_is_asked_for(tmp_path):
    """Inside restricted_unpickling, a torch.load that asks for weights_only=False (as DeepSpeed's do) still runs
    the weights_only unpickler: what a scan could miss cannot run code either."""
    marker = tmp_path / "code-ran"
    torch.save({"x": RunsCode(marker)}, tmp_path / "f.pt")
    with checkpoint.restricted_unpickling(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "f.pt", weights_only=False)
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "state": np.random.get_state()}, tmp_path / "g.pt")
    with checkpoint.restricted_unpickling():
        assert torch.equal(torch.load(tmp_path / "g.pt", weights_only=False)["w"], torch.ones(2))


def test_a_symlink_inside_a_checkpoint_is_refused(tmp_path, world, ds_json):
    """A link could bring files in from outside that DeepSpeed would load and the scan would not see."""
    m = manager(tmp_path, world, tiny_engine(ds_json(0), **to_dict(MODEL)))
    m.save(1)
    (tmp_path / "elsewhere").mkdir()
    (m.dir / "step_00000001" / "zero").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="zero: a symlink inside a checkpoint; refusing to load it"):
        manager(tmp_path, world).find()


def test_the_universal_converter_unpickles_restricted(tmp_path, world, ds_json):
    """DeepSpeed's converter (a process of its own) runs under the same restriction: a planted pickle in a ZeRO file
    makes the conversion fail and never runs."""
    from pretrain.engine import convert_to_universal

    m = manager(tmp_path, world, tiny_engine(ds_json(1), **to_dict(MODEL)))
    m.save(1)
    marker, d = tmp_path / "code-ran", m.dir / "step_00000001"
    (states,) = d.glob("*optim_states.pt")
    with checkpoint.restricted_unpickling():
        state = torch.load(states, weights_only=False)
    torch.save({**state, "planted": RunsCode(marker)}, states)
    with pytest.raises(RuntimeError, match="UnpicklingError"):
        convert_to_universal(d, tmp_path / "universal")
    assert not marker.exists()
