"""launch/checkpoints.py as a script: what `list` prints and the status scripts rely on."""

import subprocess
import sys

from ..helpers import REPO, fake_checkpoint


def list_run(run) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch/checkpoints.py"), "list", str(run)], capture_output=True, text=True
    )


def test_list_exits_1_on_an_invalid_checkpoint_or_a_damaged_latest(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        fake_checkpoint(ckpt, step)
    (ckpt / "latest").write_text("step_00000002")
    r = list_run(tmp_path)
    assert r.returncode == 0 and "step_00000002" in r.stdout and "valid (latest)" in r.stdout, r.stderr

    (ckpt / "step_00000001" / "complete.json").write_bytes(b"[]")  # a damaged record
    r = list_run(tmp_path)
    assert r.returncode == 1 and "complete.json: unreadable" in r.stdout and "1 of 2 checkpoint(s) invalid" in r.stdout

    fake_checkpoint(tmp_path / "other" / "checkpoints", 3)
    (tmp_path / "other" / "checkpoints" / "latest").write_bytes(b"\xff\xfestep")  # not UTF-8
    r = list_run(tmp_path / "other")
    assert r.returncode == 1 and "latest names '\ufffd\ufffdstep', which is not a checkpoint here" in r.stdout
    assert "Traceback" not in r.stderr

    r = list_run(tmp_path / "empty")
    assert r.returncode == 1 and "no checkpoints" in r.stdout


def test_rewind_moves_the_later_checkpoints_aside_and_points_latest_back(tmp_path):
    from pretrain.checkpoint import newest_valid, universal_tag

    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        fake_checkpoint(ckpt, step)
    (ckpt / universal_tag("step_00000004")).mkdir()  # a conversion goes with its checkpoint
    (ckpt / "latest").write_text("step_00000004")

    def rewind(to):
        cmd = [sys.executable, str(REPO / "launch/checkpoints.py"), "rewind", str(tmp_path), "--to", to]
        return subprocess.run(cmd, capture_output=True, text=True)

    r = rewind("step_00000002")
    assert r.returncode == 0, r.stderr
    moved = list((tmp_path / "previous").glob("*/checkpoints"))
    assert len(moved) == 1 and sorted(p.name for p in moved[0].iterdir()) == [
        "step_00000003", "step_00000004", universal_tag("step_00000004")
    ]  # fmt: skip
    assert f"resumes from step_00000002; step_00000003, step_00000004 moved to {moved[0]}" in r.stdout
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_00000001", "step_00000002"]
    assert (ckpt / "latest").read_text() == "step_00000002" and newest_valid(ckpt) == "step_00000002"
    r = rewind("step_00000009")
    assert r.returncode == 1 and "cannot rewind to it" in r.stderr and "step_00000009" in r.stderr
    assert (ckpt / "latest").read_text() == "step_00000002"  # nothing changed
