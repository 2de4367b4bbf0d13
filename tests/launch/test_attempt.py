"""launch/attempt.py and launch/slurm/hosts.py as scripts: what the batch scripts read from them."""

import json
import subprocess
import sys

from ..helpers import REPO, run_env


def tool(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**run_env(), **(env or {})}, timeout=120)  # fmt: skip


def config_args(run_dir):
    return ["--config", "launch/configs/demo.yaml", f"train.run_dir={run_dir}"]


def write_record(run_dir, **fields):
    (run_dir / "attempts").mkdir(parents=True, exist_ok=True)
    record = {"state": "stopped", "attempt": "slurm-7-0", "host": "h", "pid": 1, "started": "t", "start_step": 0,
              "saved_step": 10, "ended": "t", "exit_status": 3, "stop": "signal", "message": "SIGUSR1 received"}  # fmt: skip
    (run_dir / "attempts" / f"{fields.get('attempt', 'slurm-7-0')}.json").write_text(json.dumps({**record, **fields}))


def test_check_prints_the_run_dir_or_refuses_a_bad_config(tmp_path):
    r = tool("launch/attempt.py", "check", *config_args(tmp_path / "run"))
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "run")
    r = tool("launch/attempt.py", "check", *config_args(tmp_path / "run"), "model.no_such_key=1")
    assert r.returncode == 2 and "model.no_such_key" in r.stderr and "Traceback" not in r.stderr


def test_decide_prints_the_action_and_appends_it(tmp_path):
    run = tmp_path / "run"
    write_record(run)
    slurm = {"SLURM_JOB_ID": "7"}  # SLURM_RESTART_COUNT is unset on a job's first run
    r = tool("launch/attempt.py", "decide", "--max-restarts", "2", *config_args(run), env=slurm)
    assert r.returncode == 0 and r.stdout == "requeue\tstopped after saving step 10 (SIGUSR1 received)\n", r.stderr
    r = tool("launch/attempt.py", "decide", "--cancelled", *config_args(run), env=slurm)
    assert r.stdout.startswith("done\t")
    assert len((run / "attempts.jsonl").read_text().splitlines()) == 2
    r = tool("launch/attempt.py", "show", run)
    assert r.returncode == 0 and "slurm-7-0  requeue" in r.stdout and "slurm-7-0  done" in r.stdout
    assert "slurm-7-0: started t on h at step 0, stopped t (exit status 3); saved step 10: SIGUSR1" in r.stdout
    r = tool("launch/attempt.py", "check", "--sample-prompt", "Once upon", *config_args(run), "data.seed=3")
    assert r.returncode == 0, r.stderr  # every launch/pretrain.py argument is accepted


def test_status_exits_with_the_runs_own_status(tmp_path):
    run = tmp_path / "run"
    mine = {"PRETRAIN_ATTEMPT_ID": "slurm-7-0"}
    for fields, status in [({}, 3), ({"state": "finished", "exit_status": 0}, 0),
                           ({"state": "failed", "exit_status": 4, "message": "NonFinite: x"}, 4)]:  # fmt: skip
        write_record(run, **fields)
        r = tool("launch/attempt.py", "status", *config_args(run), env=mine)
        assert r.returncode == status, r.stdout + r.stderr
    r = tool("launch/attempt.py", "status", "--otherwise", "137", *config_args(run), env={"PRETRAIN_ATTEMPT_ID": "b"})
    assert r.returncode == 137 and "left no record" in r.stdout  # the record is another attempt's
    write_record(run, state="running", exit_status=None)
    assert tool("launch/attempt.py", "status", *config_args(run), env=mine).returncode == 1


def test_hosts_writes_a_deepspeed_hostfile_and_finds_the_head(tmp_path):
    out = tmp_path / "hostfile"
    r = tool("launch/slurm/hosts.py", "hostfile", out, "--nodelist", "gpu[07-08]", env={"SLURM_GPUS_ON_NODE": "4"})
    assert r.returncode == 0 and out.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    r = tool("launch/slurm/hosts.py", "rendezvous", "--nodelist", "localhost,n2", env={"MASTER_PORT": "29400"})
    assert r.stdout == "localhost:29400\n"
    r = tool("launch/slurm/hosts.py", "head", "--nodelist", "n[1-")
    assert r.returncode == 2 and "cannot read the Slurm node list 'n[1-'" in r.stderr
    r = tool("launch/slurm/hosts.py", "head", env={"SLURM_JOB_NODELIST": ""})
    assert r.returncode == 2 and "no node list" in r.stderr
