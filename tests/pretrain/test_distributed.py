"""Joining the process group in this process: the check for build locks left by a killed DeepSpeed op build."""

import logging
import os
import time

from pretrain.distributed import BUILD_LOCK_STALE_SECONDS, init_distributed, stale_build_locks


def make_lock(path, age):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_locks_older_than_a_build_are_reported_with_their_age(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    old = make_lock(tmp_path / "cpu_adam" / "lock", 3600)
    building = make_lock(tmp_path / "deepspeed_shm_comm" / "lock", BUILD_LOCK_STALE_SECONDS - 60)
    (tmp_path / "fused_adam").mkdir()  # a folder without a lock
    deeper = make_lock(tmp_path / "py311_cpu" / "cpu_adam" / "lock", 2 * 3600)  # torch's default layout
    now = time.time()
    found = stale_build_locks(now)
    assert [lock for lock, _ in found] == [old, deeper]
    assert abs(found[0][1] - 3600) < 5 and abs(found[1][1] - 7200) < 5
    assert building.exists()  # only reported, never removed: another process may be building
    earlier = now - 3600 + BUILD_LOCK_STALE_SECONDS - 10  # when `old` was 290 s old
    assert [lock for lock, _ in stale_build_locks(earlier)] == [deeper]


def test_joining_warns_about_a_stale_lock(world, tmp_path, monkeypatch, caplog):
    """A run on a node whose last build was killed would hang in DeepSpeed's init without a word; it says why first.
    (Joined again here, on the `world` fixture's group of one: DeepSpeed keeps the group it has.)"""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = make_lock(tmp_path / "cpu_adam" / "lock", 7200)
    with caplog.at_level(logging.WARNING, logger="pretrain.distributed"):
        assert init_distributed() == world
    assert [r.getMessage() for r in caplog.records if r.name == "pretrain.distributed"] == [
        f"{lock} is 120 min old: a build of a DeepSpeed op in that folder was killed (kill -9, a job's time limit) or "
        "is still running elsewhere. If none is running, delete the file: a run that needs the op waits for it forever"
    ]
