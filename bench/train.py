"""Training throughput: our DeepSpeed engine against a plain PyTorch loop of the same model, and MFU.

    .venv/bin/python bench/train.py                 # about 8 minutes on 2 cores (more on a slow day)
    .venv/bin/python bench/train.py --steps 3 --rounds 1

One process, fp32, 2 threads. The model is the one the issue fixes: 6 layers, d_model 384, 6 heads, seq 256,
batch 8, vocab 32000 (so 2048 tokens per step). In one run it measures
  - the machine's fp32 matmul peak (best of square matmuls, n = 1024 and 2048),
  - a plain PyTorch loop (our Transformer, torch.optim.AdamW, cross-entropy; no DeepSpeed),
  - our Engine (`pretrain.engine.Engine`, the trainer's path) with ZeRO stage 0 and 1,
  - the Engine (ZeRO-0) with document masking (model.document_masking, positions restarted; windows holding
    documents of 64 tokens on average), and with the model compiled (train.compile; compiling is in the untimed
    warmup steps),
each measured in a fresh process (no runner inherits another's heap), interleaved over --rounds so that machine
noise hits all alike, keeping each one's best round. The plain loop is also run with glibc's default allocator
settings, to show what `tune_cpu_allocator` (applied by the trainer on CPU) is worth. Prints tokens/s,
achieved GFLOP/s (model FLOPs, `Transformer.flops_per_token`), MFU against the measured peak, and the engine /
plain ratio. Targets: engine >= 0.97x plain; MFU >= 72% (ZeRO-0 and 1). Document masking and compilation are
reported against engine ZeRO-0, without a target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/ is on the path when run as a script)

from pretrain.config import BatchPlan, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from pretrain.model import Transformer  # noqa: E402

MODEL = ModelConfig(vocab_size=32000, d_model=384, n_layers=6, n_heads=6, seq_len=256)
BATCH = 8
OPTIM = OptimConfig(lr=3e-4, warmup_steps=0, weight_decay=0.1, grad_clip=1.0)


EOD = 2


def batches(n: int, seed: int = 0, *, documents: bool = False) -> list[torch.Tensor]:
    """Random token windows; with `documents`, an EOD ends a document after 64 tokens on average."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(3, MODEL.vocab_size, (BATCH, MODEL.seq_len + 1), generator=g)
        if documents:
            x[torch.rand(x.shape, generator=g) < 1 / 64] = EOD
        out.append(x)
    return out


class Plain:
    """The reference: the same model and optimizer settings, a textbook loop."""

    name = "plain PyTorch"

    def __init__(self):
        self.model = Transformer(MODEL)
        self.model.init_weights(0)
        from pretrain.engine import param_groups

        self.opt = torch.optim.AdamW(
            param_groups(self.model, OPTIM), lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps, fused=True
        )

    def step(self, x: torch.Tensor) -> float:
        loss = F.cross_entropy(self.model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


class EngineRun:
    def __init__(self, stage: int, workdir: Path, *, masking: bool = False, compile: bool = False):
        import dataclasses

        from pretrain.engine import Engine

        ds_json = workdir / f"zero{stage}.json"
        ds_json.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        train = TrainConfig(ds_config=str(ds_json), micro_batch_seqs=BATCH, global_batch_seqs=BATCH, precision="fp32",
                            compile=compile)  # fmt: skip
        self.engine = Engine(OPTIM, train, BatchPlan.resolve(train, seq_len=MODEL.seq_len, world_size=1))
        model = MODEL
        if masking:
            model = dataclasses.replace(MODEL, document_masking=True, document_positions=True, eod_id=EOD)
        self.engine.build(model, seed=0)  # the trainer's model + engine build

    def step(self, x: torch.Tensor) -> float:
        return self.engine.train_step([x], OPTIM.lr).loss.item()


def timed(runner, data: list[torch.Tensor], warmup: int) -> float:
    """Seconds per step over `data`, after `warmup` untimed steps."""
    for x in data[:warmup]:
        runner.step(x)
    t0 = time.perf_counter()
    for x in data[warmup:]:
        runner.step(x)
    return (time.perf_counter() - t0) / (len(data) - warmup)


RUNNERS = {
    "plain PyTorch": lambda tmp: Plain(),
    "plain PyTorch, default allocator": lambda tmp: Plain(),
    "engine ZeRO-0": lambda tmp: EngineRun(0, tmp),
    "engine ZeRO-1": lambda tmp: EngineRun(1, tmp),
    "engine ZeRO-0, document masking": lambda tmp: EngineRun(0, tmp, masking=True),
    "engine ZeRO-0, compiled": lambda tmp: EngineRun(0, tmp, compile=True),
}
TARGETED = ("engine ZeRO-0", "engine ZeRO-1")


def measure_one(name: str, args: argparse.Namespace) -> dict:
    """In a fresh process: build one runner, time it, and measure the matmul peak alongside."""
    torch.set_num_threads(args.threads)
    if "default allocator" not in name:
        from pretrain.engine import tune_cpu_allocator

        tune_cpu_allocator()  # as the trainer does on CPU
    if name.startswith("engine"):
        from pretrain.distributed import init_distributed

        init_distributed()  # a process group of one, as `python launch/pretrain.py` makes
    with tempfile.TemporaryDirectory() as tmp:
        runner = RUNNERS[name](Path(tmp))
        seconds = timed(runner, batches(args.warmup + args.steps, documents="masking" in name), args.warmup)
    from pretrain.engine import measure_matmul_flops

    return {"seconds": seconds, "peak": measure_matmul_flops(sizes=(1024, 2048))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per round (default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each round (default: 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runner's best is kept (default: 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", choices=list(RUNNERS), help=argparse.SUPPRESS)  # internal: measure one runner
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return 0
    best = dict.fromkeys(RUNNERS, float("inf"))
    peak = 0.0
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    for r in range(args.rounds):
        for name in RUNNERS:  # each in its own process: no runner inherits another's heap or threads
            out = subprocess.run([sys.executable, __file__, "--one", name, *common], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(out.stdout.strip().splitlines()[-1])
            best[name] = min(best[name], result["seconds"])
            peak = max(peak, result["peak"])
            print(f"round {r + 1}/{args.rounds}: {name}: {result['seconds']:.3f} s/step", flush=True)
    report(best, peak, args)
    return 0


def report(best: dict[str, float], peak: float, args: argparse.Namespace) -> None:
    import deepspeed

    flops_per_step = Transformer(MODEL).flops_per_token(MODEL.seq_len) * BATCH * MODEL.seq_len
    cpu = cpu_model()
    print(
        f"\n{date.today()} | {cpu} | {os.cpu_count()} cores, {args.threads} threads, 1 process, fp32 | "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}"
    )
    print(
        "model: 6 layers, d_model 384, 6 heads, seq 256, batch 8, vocab 32000 = "
        f"{flops_per_step / 1e9:.1f} GFLOP per step (6N + attention)"
    )
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best square matmul, n = 1024 and 2048)\n")
    print("| run | s/step | tokens/s | GFLOP/s | MFU | vs plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    plain = best["plain PyTorch"]
    for name, sec in best.items():
        achieved = flops_per_step / sec
        print(
            f"| {name} | {sec:.3f} | {BATCH * MODEL.seq_len / sec:,.0f} | {achieved / 1e9:.1f} | "
            f"{achieved / peak:.1%} | {plain / sec:.3f}x |"
        )
    engines = [n for n in best if n in TARGETED]
    worst = min(plain / best[n] for n in engines)
    mfu = min(flops_per_step / best[n] / peak for n in engines)
    print(f"\nengine >= 0.97x plain: {'PASS' if worst >= 0.97 else 'FAIL'} ({worst:.3f}x, the slower ZeRO stage)")
    print(f"MFU >= 72%: {'PASS' if mfu >= 0.72 else 'FAIL'} ({mfu:.1%}, the slower ZeRO stage)")
    base = best["engine ZeRO-0"]
    for name in ("engine ZeRO-0, document masking", "engine ZeRO-0, compiled"):
        print(f"{name}: {base / best[name]:.3f}x the speed of engine ZeRO-0")


if __name__ == "__main__":
    sys.exit(main())
