"""launch/slurm/prep.sbatch on a live 2-node Slurm cluster (the `slurm` fixture): one `sbatch --array` command
tokenizes the parts on both nodes, its merge job joins them once every part is done; the result equals a
single-machine `tokenize`, passes `inspect` and trains. A failing part fails its task and the merge never runs."""

import json
import sys
import time

import numpy as np
import pytest

from data_prep import inspect_shards
from pretrain.shards import IndexedShard, manifest_shards, read_manifest

from ..helpers import DIST_ENV, REPO, pretrain, tiny_overrides, tokenize, write_jsonl
from ..slurm_cluster import FINAL_STATES, parse_record

SCRIPT = "launch/slurm/prep.sbatch"
OPTIONS = ["--val-fraction", "0.1", "--shard-tokens", "20000", "--workers", "1", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, speeches):
    """A big .jsonl of speech paragraphs (split between parts), three .txt speeches, a small .jsonl."""
    root = tmp_path_factory.mktemp("prep_inputs")
    paragraphs = [p for s in speeches[:20] for p in s.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    write_jsonl(root / "a_big.jsonl", paragraphs)
    for i, s in enumerate(speeches[20:23]):
        (root / f"b_{i}.txt").write_text(s.read_text(encoding="utf-8"), encoding="utf-8")
    write_jsonl(root / "c_small.jsonl", paragraphs[:40])
    return root


def submit(slurm, tmp_path, parts: int, tokenize_args, *sbatch_args) -> int:
    """`sbatch --array=0-(parts-1) prep.sbatch ...` from the repository, as a user on a login node would."""
    (tmp_path / "logs").mkdir(exist_ok=True)  # Slurm does not create the output file's directory
    env = {**{k: v for k, v in slurm.env.items() if k not in DIST_ENV}, "PYTHON": sys.executable}
    return slurm.sbatch(
        [f"--array=0-{parts - 1}", *sbatch_args, f"--output={tmp_path}/logs/%x-%A_%a.out", SCRIPT,
         "--parts-dir", tmp_path / "parts", "--output", tmp_path / "merged", "--",
         *map(str, tokenize_args)],
        cwd=REPO, env=env,
    )  # fmt: skip


def wait_tasks(slurm, array_job: int, count: int, timeout: float = 120) -> list[dict]:
    """Every task of an array job once all have ended (scontrol prints one record per started task, and one for
    the pending ones together: ArrayTaskId=2-3)."""
    deadline = time.monotonic() + timeout
    tasks: list[dict] = []
    while time.monotonic() < deadline:
        r = slurm.run(["scontrol", "-o", "show", "job", str(array_job)], timeout=15)
        tasks = [parse_record(line) for line in r.stdout.splitlines() if line.strip()]
        started = [t for t in tasks if t.get("ArrayTaskId", "").isdigit()]
        if len(started) == count and all(t["JobState"] in FINAL_STATES for t in started):
            return sorted(tasks, key=lambda t: int(t["ArrayTaskId"]))
        time.sleep(0.25)
    raise TimeoutError(f"array job {array_job} not finished after {timeout}s: {tasks}")


def merge_job(tmp_path, array_job: int) -> int:
    return int((tmp_path / "parts" / f".merge-job-{array_job}").read_text())


def logs(tmp_path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "logs").glob("*.out")))


def split_stream(out):
    """Per split: the document lengths and all tokens, in order (shard boundaries do not matter)."""
    result = {}
    for split, shards in manifest_shards(read_manifest(out)).items():
        docs = [np.asarray(s[i]) for s in (IndexedShard(out / info.prefix) for info in shards) for i in range(len(s))]
        result[split] = ([len(d) for d in docs], np.concatenate(docs) if docs else np.zeros(0))
    return result


def test_four_parts_on_two_nodes_merge_into_the_single_run_dataset(slurm, tmp_path, inputs, tokenizer_path):
    args = [inputs, "--tokenizer", tokenizer_path, *OPTIONS]
    job = submit(slurm, tmp_path, 4, args, "-N1", "--cpus-per-task=2")  # 2 tasks fill a node (4 CPUs): both used
    tasks = wait_tasks(slurm, job, 4)
    merge = slurm.wait_job(merge_job(tmp_path, job), timeout=120)
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 4, logs(tmp_path)
    assert {t["NodeList"] for t in tasks} == {"n1", "n2"}
    assert merge["JobState"] == "COMPLETED", logs(tmp_path)
    assert merge["JobName"] == "prep-merge" and merge["Dependency"] == "(null)"
    log = logs(tmp_path)
    assert "submitted the merge job" in log and log.count("is complete: ") == 4 and "is merged and sound" in log

    merged, single = tmp_path / "merged", tmp_path / "single"
    assert read_manifest(merged)["merged"]["parts"] == 4
    assert read_manifest(tmp_path / "parts" / "000")["inputs"][0].get("end")  # the big file was split
    assert tokenize([inputs], single, tokenizer_path, *OPTIONS) == 0
    want, got = split_stream(single), split_stream(merged)
    for split in ("train", "val"):
        assert got[split][0] == want[split][0] and np.array_equal(got[split][1], want[split][1]), split
    assert inspect_shards.main([str(merged), "--samples", "0"]) == 0

    run = tmp_path / "run"
    overrides = ["train.global_batch_seqs=4", "train.max_steps=3", "train.eval_every=0", "logging.log_every=1"]
    r = pretrain("python", 1, tiny_overrides(tokenizer_path, merged, run) + overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3


def test_a_failing_part_fails_its_task_and_the_merge_is_cancelled(slurm, tmp_path, inputs, tokenizer_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text((inputs / "c_small.jsonl").read_text())
    (bad / "z.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')  # the last part reads it: --on-error fail
    job = submit(slurm, tmp_path, 2, [bad, "--tokenizer", tokenizer_path, *OPTIONS])
    tasks = wait_tasks(slurm, job, 2)
    assert [t["JobState"] for t in tasks] == ["COMPLETED", "FAILED"], logs(tmp_path)
    assert tasks[1]["ExitCode"] == "1:0"
    merge = slurm.wait_job(merge_job(tmp_path, job), timeout=60)  # --kill-on-invalid-dep: cancelled, not pending
    assert (merge["JobState"], merge["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied")
    assert merge["Dependency"] == f"afterok:{job}_*(failed)"
    log = logs(tmp_path)
    assert "malformed JSON" in log and "part 1 failed (status 1): the merge job will not run" in log
    assert not (tmp_path / "merged").exists()
