"""Which data made a training step: every sample of the global batch of STEP, with its dataset, documents and text.

    python launch/inspect_step.py runs/demo 1200                 # step 1200 as the logs number it
    python launch/inspect_step.py runs/demo 1200 --output step_1200.jsonl --chars 0

The data order is a pure function of (data.seed, sample number, data.skip_samples), so the batch of any step,
past or future, is computed from the run's resolved config (RUN/config.yaml) and its datasets, on any machine,
without a GPU or a checkpoint. Step N (logged after its update) trained on slots [(N - 1) * G, N * G) of the order,
G = the global batch in sequences. For each sample: its global sample number (what `data.skip_samples` takes), the
dataset and its sample number there, the window's token range in the dataset's split, and each document it
overlaps (its number in the split, shard and index, the part inside the window, the decoded text).

To leave a batch out of a resumed run: `launch/pretrain.py ... 'data.skip_samples=[[FIRST, LAST + 1]]'` with the
global sample numbers printed here (checkpoint.resume may then go back to a checkpoint before them).

--output writes one JSON object per sample (with the window's token ids); exit status 0, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("run_dir", help="the run directory (its config.yaml names the data)")
    p.add_argument("step", type=int, help="the step, numbered as the logs number it (1 = the first update)")
    p.add_argument("--output", help="write the samples as JSON lines to this file (atomically)")
    p.add_argument("--chars", type=int, default=200, help="characters of text shown per document (0: all)")
    return p


def step_samples(run_dir: Path, step: int) -> list[dict]:
    """The samples of step `step` (1-based) of the run in `run_dir`, as `--output` writes them."""
    from pretrain.build import CONFIG, open_tokenizer
    from pretrain.config import BatchPlan, ConfigError, load_config
    from pretrain.data import build_dataset

    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is {run_dir} a run directory that has started?)")
    cfg = load_config(path)
    if step < 1:
        raise ConfigError(f"step: {step} is not a step (the first is 1)")
    tokenizer = open_tokenizer(cfg.data.tokenizer)
    plan = BatchPlan.resolve(cfg.train, seq_len=cfg.model.seq_len, world_size=1)
    data = build_dataset(
        cfg.data.datasets, "train", seq_len=plan.seq_len, seed=cfg.data.seed, tokenizer=tokenizer.describe(),
        key="data.datasets", skip_samples=cfg.data.skip_samples,
    )  # fmt: skip
    first = (step - 1) * plan.global_batch
    out = []
    for slot, (number, d, k) in enumerate(data.locate(first, first + plan.global_batch), start=first):
        dataset = data.datasets[d]
        window = dataset.window_of(k)
        start = window * plan.seq_len
        ids = dataset.sample(k)
        documents = dataset.stream.documents(start, start + plan.seq_len + 1)
        at = 0
        for doc in documents:  # the text of each document's part in the window
            n = doc["tokens"][1] - doc["tokens"][0]
            doc["text"] = tokenizer.decode(ids[at : at + n])
            at += n
        out.append({
            "step": step, "slot": slot, "sample": number, "dataset": dataset.stream.name,
            "dataset_sample": k, "window": window, "tokens": [start, start + plan.seq_len + 1],
            "documents": documents, "ids": ids.tolist(),
        })  # fmt: skip
    return out


def show(samples: list[dict], chars: int) -> str:
    lines = []
    for s in samples:
        lines.append(f"sample {s['sample']} (slot {s['slot']}): {s['dataset']} sample {s['dataset_sample']}, "
                     f"tokens [{s['tokens'][0]}, {s['tokens'][1]})")  # fmt: skip
        for doc in s["documents"]:
            text = doc["text"] if chars <= 0 or len(doc["text"]) <= chars else doc["text"][:chars] + "..."
            a, b = doc["tokens"]
            lines.append(f"  document {doc['id']} ({Path(doc['shard']).name} #{doc['index']}), tokens [{a}, {b}) of "
                         f"{doc['length']}: {json.dumps(text, ensure_ascii=False)}")  # fmt: skip
    return "\n".join(lines)


def run(args) -> int:
    from pretrain.fileutil import write_bytes_atomic

    samples = step_samples(Path(args.run_dir), args.step)
    numbers = [s["sample"] for s in samples]
    print(f"step {args.step}: {len(samples)} samples, global sample numbers {numbers[0]}..{numbers[-1]}"
          + ("" if numbers[-1] - numbers[0] + 1 == len(numbers) else " (some skipped between)"))  # fmt: skip
    print(show(samples, args.chars))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples).encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.errors import run_tool

    return run_tool(run, args)


if __name__ == "__main__":
    sys.exit(main())
