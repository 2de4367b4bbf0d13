"""Plan a run before starting it: parameters, FLOPs, tokens, steps, memory per GPU for each ZeRO stage, wall time.

    python launch/plan.py --config launch/configs/7b.yaml --nodes 8 --gpus-per-node 8
    python launch/plan.py --config launch/configs/1b.yaml --nodes 1 --gpus-per-node 8 --gpu A100 --mfu 0.35 \\
        train.micro_batch_seqs=4 model.activation_checkpointing=false

No GPU is needed and nothing is allocated: the model is built on PyTorch's meta device. Memory per GPU is model
states (weights, gradients, optimizer states: DeepSpeed's own estimators for ZeRO-2 and 3, the same byte counts
for 0 and 1; see pretrain/plan.py) + activations of one micro-batch (with and without activation checkpointing)
+ the buffers the DeepSpeed config asks for. Wall time is at --mfu of the GPU's dense bf16 peak (the table the
trainer's MFU uses). The vocab is the tokenizer's when data.tokenizer exists, else model.vocab_size, else
--vocab-size. A warning names what does not fit in --gpu's memory (or --gpu-memory-gib).

Exit status: 0 (also when it does not fit: it is a report), 2 on a bad config or argument.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pretrain` is the package, not a script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--gpu", default="H100", help="the GPU (a name of pretrain.engine.KNOWN_PEAKS; default: H100)")
    p.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (default: the --gpu's)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to expect (default: 0.4)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="weights and activations")
    p.add_argument("--vocab-size", type=int, default=32000, help="without a tokenizer or model.vocab_size")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (as for launch/pretrain.py)")
    return p


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def report(plan, config: str) -> list[str]:
    from pretrain.plan import STAGES

    s, b = plan.shape, plan.plan
    days = plan.seconds / 86400
    lines = [
        f"plan: {config} on {plan.nodes} node(s) x {plan.gpus // plan.nodes} {plan.gpu} ({gib(plan.gpu_memory)} GiB "
        f"each), {plan.precision}",
        f"model: {human(s.params)} parameters (largest layer {human(s.largest_layer)}), {s.flops_per_token / 1e9:,.2f} "
        f"GFLOP per token",
        f"batch: {b.global_batch} x {b.seq_len} = {human(b.tokens_per_step)} tokens per step (micro-batch "
        f"{b.micro_batch}, accumulation {b.grad_accum}); {plan.steps:,} steps = {human(plan.tokens)} tokens",
        f"time: {plan.seconds / 3600:,.1f} h ({days:,.1f} days) at {plan.mfu:.0%} MFU of {plan.peak_flops / 1e12:,.0f} "
        f"TFLOP/s per GPU ({plan.gpus * plan.peak_flops * plan.mfu / 1e15:,.2f} PFLOP/s in all)",
        "",
        "memory per GPU, GiB (activations: one micro-batch; buffers: the ds config's buckets)",
        f"{'':8} {'states':>8} {'act. ckpt':>10} {'act. full':>10} {'buffers':>8} {'total':>8}",
    ]
    for stage in STAGES:
        total = plan.total(stage, plan.checkpointing)
        mark = " <- this config" if stage == plan.stage else ""
        fits = "" if total <= plan.gpu_memory else " (does not fit)"
        lines.append(
            f"ZeRO-{stage:<3} {gib(plan.states[stage]):>8} {gib(plan.activations[True]):>10} "
            f"{gib(plan.activations[False]):>10} {gib(plan.buffers[stage]):>8} {gib(total):>8}{fits}{mark}"
        )
    lines.append(f"(total: with{'' if plan.checkpointing else 'out'} activation checkpointing, as the config says)")
    need = plan.total(plan.stage, plan.checkpointing)
    if need > plan.gpu_memory:
        lines += ["", f"WARNING: ZeRO-{plan.stage} as configured needs {gib(need)} GiB per GPU, more than the "
                  f"{gib(plan.gpu_memory)} GiB of a {plan.gpu}: raise the ZeRO stage, turn on "
                  "model.activation_checkpointing, lower train.micro_batch_seqs or use more GPUs"]  # fmt: skip
    return lines


def run(args) -> int:
    from pretrain.config import ConfigError, load_config
    from pretrain.engine import read_ds_json
    from pretrain.plan import GIB, make_plan
    from pretrain.tokenizer import Tokenizer

    for name in ("nodes", "gpus_per_node", "vocab_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(args, name)}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu: must be in (0, 1], got {args.mfu}")
    cfg = load_config(args.config, args.overrides)
    vocab = cfg.model.vocab_size
    if vocab is None:
        tok = Path(cfg.data.tokenizer)
        vocab = Tokenizer(tok).vocab_size if tok.is_file() else args.vocab_size
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    ds = read_ds_json(cfg.train.ds_config)
    try:
        plan = make_plan(cfg, ds, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=args.gpu, mfu=args.mfu,
                         precision=args.precision)  # fmt: skip
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.gpu_memory_gib:
        plan.gpu_memory = int(args.gpu_memory_gib * GIB)
    print("\n".join(report(plan, args.config)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.errors import run_tool

    return run_tool(run, args)


if __name__ == "__main__":
    sys.exit(main())
