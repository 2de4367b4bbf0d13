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
