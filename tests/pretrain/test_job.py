"""One job per run directory (the lock), the launcher watch and stop signals, in this process."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pretrain.errors import RunDirBusy
from pretrain.job import LOCK, Holder, Launcher, LauncherWatch, RunLock, StopRequest


def write_lock(run_dir, holder: Holder, *, age: float = 0.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    path.write_text(json.dumps(dataclasses.asdict(holder)))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def dead_pid() -> tuple[int, float]:
    """The pid and start time of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(p.pid).create_time()
    p.wait()
    return p.pid, started


def test_lock_is_held_recorded_and_released(tmp_path):
    with RunLock(tmp_path, stale_after=60) as lock:
        record = json.loads((tmp_path / LOCK).read_text())
        assert record["pid"] == os.getpid() and record["host"] == lock.me.host and record["started"]
        assert list(tmp_path.iterdir()) == [tmp_path / LOCK]  # no temporary file left
    assert not (tmp_path / LOCK).exists()


def test_a_second_job_is_refused_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with RunLock(tmp_path, stale_after=60) as first:
        with pytest.raises(RunDirBusy, match="is in use by another job") as e:
            RunLock(tmp_path, stale_after=60).acquire()
        assert f"host {first.me.host}, pid {os.getpid()}, Slurm job 4242, started {first.me.started}" in str(e.value)
        assert (tmp_path / LOCK).exists()  # still the first job's
    assert RunDirBusy.exit_code == 5


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
    pid, started = dead_pid()
    write_lock(tmp_path, dataclasses.replace(Holder.me(), pid=pid, pid_started=started))
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, stale_after=1e9):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"took over the lock of a job that is gone (host {Holder.me().host}, pid {pid}" in caplog.text
    assert "its process is gone" in caplog.text


def test_a_reused_pid_does_not_hold_the_lock(tmp_path, caplog):
    me = Holder.me()
    write_lock(tmp_path, dataclasses.replace(me, pid_started=me.pid_started - 3600))  # our pid, another process
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, stale_after=1e9):
        pass
    assert "its process is gone" in caplog.text


@pytest.mark.parametrize("other", [dict(boot_id="another-boot"), dict(pid_ns=1)])
def test_another_boot_or_pid_namespace_counts_as_another_host(tmp_path, caplog, other):
    """Same host name, but a restarted host, another machine of the same name, or a container: its pid says
    nothing here, so the heartbeat decides."""
    holder = dataclasses.replace(Holder.me(), pid=1, **other)
    write_lock(tmp_path, holder, age=10)
    with pytest.raises(RunDirBusy, match="heartbeat 10 s ago"):
        RunLock(tmp_path, stale_after=60).acquire()
    write_lock(tmp_path, holder, age=100)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, stale_after=60):
        pass
    assert "no heartbeat for 100 s" in caplog.text


def test_a_requeued_slurm_job_takes_over_its_earlier_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    earlier = dataclasses.replace(Holder.me(), host="node-1", pid=1, slurm_restart=0)
    write_lock(tmp_path, earlier)  # a fresh heartbeat: the earlier run was killed a moment ago
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, stale_after=300):
        pass
    assert "it is the earlier run of this requeued Slurm job (restart 0)" in caplog.text
    write_lock(tmp_path, dataclasses.replace(earlier, slurm_job_id="78"))
    with pytest.raises(RunDirBusy, match="Slurm job 78"):
        RunLock(tmp_path, stale_after=300).acquire()


def test_without_hard_links_an_exclusive_create_takes_the_lock(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with RunLock(tmp_path, stale_after=60):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunLock(tmp_path, stale_after=60).acquire()
    assert list(tmp_path.iterdir()) == []


def test_a_run_dir_that_cannot_be_written_is_an_error_naming_it(tmp_path):
    from pretrain.distributed import World
    from pretrain.errors import BadInput
    from pretrain.job import hold_run_dir

    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match="train.run_dir: cannot hold a lock in .*file/run"):
        with hold_run_dir(tmp_path / "file" / "run", World(), stale_after=60):
            pass


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path, caplog):
    other = dataclasses.replace(Holder.me(), host="node-17", pid=1)
    write_lock(tmp_path, other, age=30)
    with pytest.raises(RunDirBusy, match=r"host node-17, pid 1.*heartbeat 30 s ago"):
        RunLock(tmp_path, stale_after=60).acquire()
    write_lock(tmp_path, other, age=90)
    with caplog.at_level(logging.WARNING), RunLock(tmp_path, stale_after=60):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "host node-17, pid 1" in caplog.text and "no heartbeat for 90 s" in caplog.text


def test_an_unreadable_lock_counts_by_its_heartbeat(tmp_path):
    (tmp_path / LOCK).write_bytes(b"\xff garbage")
    with pytest.raises(RunDirBusy, match="unreadable record in"):
        RunLock(tmp_path, stale_after=60).acquire()
    os.utime(tmp_path / LOCK, (time.time() - 120, time.time() - 120))
    with RunLock(tmp_path, stale_after=60):
        pass


def test_the_heartbeat_touches_the_lock_and_notices_a_takeover(tmp_path):
    lost = []
    lock = RunLock(tmp_path, stale_after=5, on_lost=lost.append)  # a heartbeat every 0.5 s
    lock.acquire()
    os.utime(tmp_path / LOCK, (0, 0))
    time.sleep(1.2)
    assert time.time() - (tmp_path / LOCK).stat().st_mtime < 2 and not lost
    os.unlink(tmp_path / LOCK)  # another job judged us dead and took the directory
    write_lock(tmp_path, dataclasses.replace(Holder.me(), host="node-3"))
    time.sleep(2.2)  # lost after 3 heartbeats in a row that find another's lock
    assert [h.host for h in lost] == ["node-3"]
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["host"] == "node-3"  # release leaves the new holder's lock


def test_the_launcher_watch_sees_its_launcher_end_even_unreaped():
    proc = subprocess.Popen(["sleep", "30"])
    gone = []
    watch = LauncherWatch(
        Launcher("test", [(proc.pid, psutil.Process(proc.pid).create_time())]), gone.append, interval=0.1
    )
    time.sleep(0.3)
    assert gone == []
    os.kill(proc.pid, signal.SIGKILL)  # not waited for: a zombie until reaped, which counts as gone
    deadline = time.monotonic() + 5
    while not gone and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [g.name for g in gone] == ["test"]
    watch.close()
    proc.wait()


def test_a_process_started_directly_has_no_launcher():
    code = "from pretrain.job import detect_launcher; l = detect_launcher(); print(l and l.name)"
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_RUN_ID"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "None"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "TORCHELASTIC_RUN_ID": "x"}
    )
    assert out.stdout.strip() == "torchrun"


def test_later_stop_signals_never_cut_the_save_short(monkeypatch):
    """Copies of the stop signal (Slurm and torchrun both deliver it), a time limit's TERM after its USR1 warning, a
    launcher terminating rank 0 once the other ranks have exited: none may exit in the middle of a save; the first
    signal's deadline is the only limit."""
    stop = StopRequest(["SIGUSR1", "SIGTERM"], grace=60)
    exits, deadlines = [], []
    monkeypatch.setattr(stop, "exit_now", exits.append)
    monkeypatch.setattr(stop, "arm_deadline", lambda seconds, status: deadlines.append((seconds, status)))
    try:
        for sig in (signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM, signal.SIGTERM):
            os.kill(os.getpid(), sig)
        assert stop.signal_name == "SIGUSR1" and exits == [] and deadlines == [(60, 128 + signal.SIGUSR1)]
    finally:
        stop.restore()
