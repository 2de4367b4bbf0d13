"""End-to-end training runs in real processes: 1 rank, and 2 ranks (gloo) under deepspeed and torchrun."""

import pytest

from ..helpers import pretrain, read_metrics, tiny_overrides, tokenize, write_jsonl

STEPS = 8
PROMPT = "The state of the Union is"
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
        if name in ("ref", "zero3"):
            args += ["--sample-prompt", PROMPT]  # the trainer's own greedy sample (under ZeRO-3: every rank)
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


def printed_sample(result) -> str:
    """The continuation the trainer printed after `--- greedy continuation of ...:` and the prompt."""
    out = result.stdout
    start = out.index(f"--- greedy continuation of {PROMPT!r}:\n") + len(f"--- greedy continuation of {PROMPT!r}:\n")
    return out[start:].split("\n\n")[0][len(PROMPT) :]


def test_every_zero_stage_checkpoint_loads_for_generation(runs, tokenizer):
    """The final checkpoint of ZeRO-0/1/2/3 runs (1 and 2 ranks, offload too) loads in one process; the models agree,
    and greedy generation equals what the trainer itself printed from its engine (ZeRO-1 and, on 2 ranks, ZeRO-3)."""
    import torch

    from pretrain.generate import GenerationSettings, generate
    from pretrain.inference import load_model

    prompt = tokenizer.encode(PROMPT)
    ref = load_model(runs["ref"][0])
    assert ref.source.endswith(f"step_{STEPS:08d}") and ref.cfg.vocab_size == 2000
    ids = torch.tensor([prompt])
    ref_logits = ref.model(ids)
    settings = GenerationSettings(max_new_tokens=40)
    texts = {}
    for name, (run_dir, result) in runs.items():
        loaded = load_model(run_dir)
        torch.testing.assert_close(loaded.model(ids), ref_logits, rtol=1e-3, atol=1e-3)
        (done,) = generate(
            loaded.model, [prompt], settings, vocab_size=2000, eod_id=tokenizer.eod_id, decode=tokenizer.decode
        )
        texts[name] = done.text
        if name in ("ref", "zero3"):
            assert printed_sample(result) == done.text, name
    assert len(texts["ref"]) > 10


def test_generate_cli_reads_jsonl_and_writes_jsonl(runs, tmp_path, tokenizer):
    import json
    import subprocess
    import sys

    from ..helpers import REPO

    run_dir = runs["zero3"][0]
    src = tmp_path / "prompts.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT, "id": 7}) + "\n\n" + json.dumps({"prompt": "", "id": 8}) + "\n")
    out = tmp_path / "out" / "done.jsonl"
    cmd = [sys.executable, str(REPO / "launch/generate.py"), str(run_dir), "--input", str(src), "--output", str(out)]
    result = subprocess.run([*cmd, "--max-new-tokens", "40"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [7, 8] and rows[0]["completion"] == printed_sample(runs["zero3"][1])
    assert rows[0]["prompt_tokens"] == len(tokenizer.encode(PROMPT)) and rows[1]["prompt_tokens"] == 1
    assert all(r["finish"] in ("eod", "length", "context") and r["new_tokens"] <= 40 for r in rows)
    assert rows[0]["prompt_tokens"] + rows[0]["new_tokens"] <= 33  # model.seq_len 32: the context ends it
    assert "2 prompt(s)" in result.stderr and "tokens/s" in result.stderr
    src.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and f"{src}:2: expected an object with a string field 'prompt'" in result.stderr
    result = subprocess.run([*cmd[:2], str(tmp_path), "--prompt", "x"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "neither a run directory" in result.stderr


def test_export_of_a_zero3_run_loads_in_transformers_and_starts_a_new_run(
    runs, tmp_path, tokenizer, tokenizer_path, tiny_dataset
):
    """launch/export.py to-hf on the ZeRO-3 run: transformers' logits equal ours; our loader reads the folder back
    to the same model; a 2-rank ZeRO-3 run with train.init_from=<the folder> starts from exactly those weights."""
    import os
    import subprocess
    import sys

    import torch

    from pretrain.inference import load_model

    from ..helpers import REPO, final_weights

    run_dir = runs["zero3"][0]
    out = tmp_path / "hf"
    cmd = [sys.executable, str(REPO / "launch/export.py"), "to-hf", str(run_dir), "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = load_model(run_dir)
    ids = torch.tensor([tokenizer.encode(PROMPT + " strong, and the people")])
    expected = ours.model(ids)
    torch.testing.assert_close(load_model(out).model(ids), expected, rtol=0, atol=0)

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True)(PROMPT)["input_ids"] == tokenizer.encode(PROMPT)

    cont = tmp_path / "cont"
    args = tiny_overrides(tokenizer_path, tiny_dataset, cont) + [
        f"train.init_from={out}", "train.ds_config=ds_configs/zero3.json", "train.global_batch_seqs=4",
        "train.micro_batch_seqs=2", "train.max_steps=1", "train.eval_every=0", "optim.lr=1e-12", "optim.min_lr=0",
    ]  # fmt: skip
    result = pretrain("torchrun", 2, args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting from the weights of" in result.stderr
    start = ours.model.state_dict()
    for name, value in final_weights(cont).items():  # one step at lr 1e-12 moves no weight measurably
        torch.testing.assert_close(value, start[name], rtol=0, atol=1e-8, msg=name)


@pytest.fixture(scope="module")
def masked(tmp_path_factory, tokenizer_path, speeches):
    """On a dataset of paragraphs (windows of 33 tokens hold several documents): with document masking and restarted
    positions on 1 rank (ZeRO-1, accumulating 2 micro-batches), on 2 ranks under ZeRO-3 with activation
    checkpointing (torchrun), and without masking on 1 rank."""
    root = tmp_path_factory.mktemp("masked")
    paragraphs = [p.strip() for s in speeches[:20] for p in s.read_text(encoding="utf-8").split("\n") if p.strip()]
    data = root / "paragraphs"
    assert tokenize([write_jsonl(root / "paragraphs.jsonl", paragraphs)], data, tokenizer_path) == 0
    common = [
        "train.global_batch_seqs=8",
        "train.micro_batch_seqs=4",
        "train.max_steps=4",
        "train.eval_every=4",
        "train.eval_batches=2",
        "logging.log_every=1",
    ]
    masking = ["model.document_masking=true", "model.document_positions=true"]
    setups = {
        "ref": ("python", 1, masking + ["train.ds_config=ds_configs/zero1.json"]),
        "zero3_ckpt": (
            "torchrun", 2, masking + ["train.ds_config=ds_configs/zero3.json", "model.activation_checkpointing=true"]
        ),
        "plain": ("python", 1, ["train.ds_config=ds_configs/zero1.json"]),
    }  # fmt: skip
    out = {}
    for name, (kind, nproc, extra) in setups.items():
        run_dir = root / name
        result = pretrain(kind, nproc, tiny_overrides(tokenizer_path, data, run_dir) + common + extra)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        out[name] = run_dir
    return out


def test_document_masking_trains_alike_under_zero3_with_activation_checkpointing(masked):
    ref, zero3 = by_step(masked["ref"], "train/loss"), by_step(masked["zero3_ckpt"], "train/loss")
    assert sorted(ref) == sorted(zero3) == [1, 2, 3, 4]
    for step in ref:
        assert zero3[step] == pytest.approx(ref[step], rel=1e-5), step
    assert by_step(masked["zero3_ckpt"], "eval/loss")[4] == pytest.approx(
        by_step(masked["ref"], "eval/loss")[4], rel=1e-4
    )
    plain = by_step(masked["plain"], "train/loss")  # the same data and weights without masking
    # at the start the near-uniform attention of a fresh model hides the mask; once it has learnt a little it shows
    assert plain[1] == pytest.approx(ref[1], rel=1e-6) and plain[4] != pytest.approx(ref[4], rel=1e-4)
    config = (masked["ref"] / "config.yaml").read_text()
    assert "document_masking: true" in config and "eod_id: 2" in config  # the tokenizer's, recorded


def test_a_compiled_model_trains_as_the_eager_one(tmp_path, runs, tokenizer_path, tiny_dataset):
    """train.compile (torch.compile through DeepSpeed, inductor's C++ backend on this CPU): the same losses as the
    eager 1-rank ZeRO-1 run of the `runs` fixture, within float reassociation."""
    run_dir = tmp_path / "compiled"
    args = tiny_overrides(tokenizer_path, tiny_dataset, run_dir) + [
        "train.global_batch_seqs=8", "train.micro_batch_seqs=4", f"train.max_steps={STEPS}", "train.eval_every=4",
        "train.eval_batches=2", "logging.log_every=1", "optim.grad_clip=0.05", "train.compile=true",
    ]  # fmt: skip
    result = pretrain("python", 1, args, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    eager, compiled = by_step(runs["ref"][0], "train/loss"), by_step(run_dir, "train/loss")
    assert sorted(compiled) == sorted(eager)
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5)  # the same weights: only the kernels differ
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=2e-4), step
    assert by_step(run_dir, "eval/loss")[8] == pytest.approx(by_step(runs["ref"][0], "eval/loss")[8], rel=2e-4)
