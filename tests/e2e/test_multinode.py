"""Multi-node without Slurm: launch/torchrun.sh on two "nodes" (two invocations on this machine, one rank each)
forms one run whose losses equal a 2-rank torchrun run's, and reports launch/pretrain.py's exit status, not
torchrun's."""

import signal
import subprocess
import sys
from pathlib import Path

from ..helpers import REPO, cluster_args, free_port, last_attempt, losses, pretrain, run_env, wait_for_step


def args_for(tokenizer_path, dataset, run_dir, *extra):
    return cluster_args(tokenizer_path, dataset, run_dir, 6, *extra)


def start_two_nodes(args, logs: Path) -> list[subprocess.Popen]:
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**run_env(), "PYTHON": sys.executable}
    return [
        subprocess.Popen(
            ["bash", "launch/torchrun.sh", "2", str(rank), endpoint, "--procs-per-node", "1", *args],
            cwd=REPO,
            env=env,
            stdout=open(logs / f"node{rank}.out", "w"),
            stderr=open(logs / f"node{rank}.err", "w"),
        )
        for rank in range(2)
    ]


def finish(nodes: list[subprocess.Popen], logs: Path) -> list[subprocess.CompletedProcess]:
    return [
        subprocess.CompletedProcess(p.args, p.wait(timeout=600), (logs / f"node{rank}.out").read_text(),
                                    (logs / f"node{rank}.err").read_text())
        for rank, p in enumerate(nodes)
    ]  # fmt: skip


def two_nodes(args, logs: Path) -> list[subprocess.CompletedProcess]:
    return finish(start_two_nodes(args, logs), logs)


def test_two_nodes_train_as_one_run(tmp_path, tokenizer_path, tiny_dataset):
    ref = pretrain("torchrun", 2, args_for(tokenizer_path, tiny_dataset, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    node0, node1 = two_nodes(args_for(tokenizer_path, tiny_dataset, tmp_path / "run"), tmp_path)
    assert (node0.returncode, node1.returncode) == (0, 0), node0.stderr[-3000:] + node1.stderr[-3000:]
    assert "finished (exit status 0)" in node0.stdout
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert last_attempt(tmp_path / "run")["state"] == "finished"


def test_a_stop_after_saving_exits_3_where_torchrun_says_1(tmp_path, tokenizer_path, tiny_dataset):
    args = args_for(tokenizer_path, tiny_dataset, tmp_path / "run", "train.stop_at_step=2")
    alone = pretrain("torchrun", 2, args_for(tokenizer_path, tiny_dataset, tmp_path / "alone", "train.stop_at_step=2"))
    assert alone.returncode == 1  # what torchrun itself reports for the ranks' exit 3
    node0, node1 = two_nodes(args, tmp_path)
    assert node0.returncode == 3, node0.stdout + node0.stderr[-3000:]
    assert "stopped (exit status 3): train.stop_at_step 2" in node0.stdout
    assert node1.returncode == 1  # torchrun's own, on the other node


def test_a_stop_signal_to_the_scripts_saves_and_node_0_exits_3(tmp_path, tokenizer_path, tiny_dataset):
    """TERM to each node's script (as a supervisor sends it): passed to torchrun, then to the ranks, which save;
    node 0 reports the run's own status 3, read from the attempt's record."""
    run = tmp_path / "run"
    nodes = start_two_nodes(cluster_args(tokenizer_path, tiny_dataset, run, 400), tmp_path)
    assert wait_for_step(run, 5, nodes[0]), (tmp_path / "node0.err").read_text()[-3000:]
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    node0, node1 = finish(nodes, tmp_path)
    assert node0.returncode == 3 and "stopped (exit status 3): SIGTERM received" in node0.stdout, node0.stderr[-3000:]
    assert node1.returncode == 1  # torchrun's own
    record = last_attempt(run)
    assert record["state"] == "stopped" and 5 <= record["saved_step"] < 400


def test_bad_arguments_are_refused_before_anything_starts(tmp_path, tokenizer_path, tiny_dataset):
    args = args_for(tokenizer_path, tiny_dataset, tmp_path / "run")
    for argv, message in [
        (["2", "2", "127.0.0.1:1", *args], "NODE_RANK 2 is not below NNODES 2"),
        (["2", "0", "127.0.0.1", *args], "must be HOST:PORT"),
        (["2", "0", "127.0.0.1:1", "--bogus", *args], "unknown option --bogus"),
        (["2", "0", "127.0.0.1:1", *args, "model.no_such_key=1"], "model.no_such_key"),
    ]:
        r = subprocess.run(["bash", "launch/torchrun.sh", *argv], cwd=REPO, env={**run_env(), "PYTHON": sys.executable},
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
    assert not (tmp_path / "run").exists()
