"""The one place that calls DeepSpeed: the training engine, its config, its checkpoint files.

    plan = BatchPlan.resolve(cfg.train, seq_len=cfg.model.seq_len, world_size=world.size)
    engine = Engine(cfg.optim, cfg.train, plan)       # the DeepSpeed config is settled: zero_stage, precision
    model = engine.build(cfg.model, seed=cfg.train.seed)   # the model, built (partitioned under ZeRO-3) and wrapped
    stats = engine.train_step(micro_batches, lr)     # one optimizer step over this rank's micro-batches
    logits = engine.logits(tokens)                    # eval mode, no gradients (evaluation, generation)
    engine.save(ckpt_dir, tag, client_state)  /  engine.load(ckpt_dir, tag)

`build_ds_config` reads the engine settings from a ds_configs/*.json file (ZeRO stage, offload, communication)
and injects what the run derives: the batch plan's keys (gradient accumulation = global / (micro * world size)),
gradient clipping, precision and the AdamW optimizer. A JSON that sets one of these keys to a different value stops
the run with a message naming the key; "auto" is replaced.

DeepSpeed's contract is hidden here: backward() scales the loss by the accumulation, step() is called after every
micro-batch and only updates the weights at the accumulation boundary. The learning rate is set on the
optimizer's parameter groups before each step from a pure function of the step (`lr_at`), so there is no
scheduler state. So is what DeepSpeed's checkpoint files are: the client state that makes them convertible to the
universal format, the conversion itself (`convert_to_universal`), and reading one whole fp32 state dict back
(`consolidated_state_dict`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint import constants as ds_constants

from pretrain.config import BatchPlan, ConfigError, ModelConfig, OptimConfig, TrainConfig
from pretrain.model import Transformer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- lr schedule
def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then the schedule down to min_lr.

    decay_steps defaults to the steps after warmup, so the run's last step (total_steps - 1) is at min_lr.

    cosine: min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2, p = progress through decay_steps
    linear: lr - (lr - min_lr) * p
    wsd:    lr until the last wsd_decay_fraction of decay_steps, then linear to min_lr
    constant: lr
    After decay_steps it stays at min_lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max(total_steps - 1 - cfg.warmup_steps, 1)
    p = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    span = cfg.lr - cfg.min_lr
    if cfg.schedule == "cosine":
        return cfg.min_lr + span * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return cfg.lr - span * p
    flat = 1.0 - cfg.wsd_decay_fraction  # wsd
    return cfg.lr if p <= flat else cfg.lr - span * (p - flat) / cfg.wsd_decay_fraction


# ----------------------------------------------------------------------------------------------- ds config
def accelerator_name() -> str:
    """The accelerator DeepSpeed picked: "cuda", "cpu", ..."""
    return get_accelerator().device_name()


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if accelerator_name() == "cuda" else "fp32"


def read_ds_json(path: str | Path) -> dict:
    """A ds_configs JSON as a dict, or a ConfigError naming train.ds_config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.ds_config: {path} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.ds_config: {path} must hold a JSON object")
    return ds


def zero_stage(ds: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0: none)."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_ds_config(path: str | Path, *, optim: OptimConfig, plan: BatchPlan, precision: str) -> dict:
    """The DeepSpeed config: the JSON's engine settings plus the keys this run derives (see module docstring)."""
    ds = read_ds_json(path)
    on_cpu = accelerator_name() == "cpu"
    stage = zero_stage(ds)
    derived = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": optim.grad_clip,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(
                f"train.ds_config: {path} sets {key}={ds[key]!r} but the run derives {value!r} "
                '(batch sizes and clipping come from the run config; remove the key or set it to "auto")'
            )
        ds[key] = value
    if manual_clipping(stage, precision):
        ds["gradient_clipping"] = 0.0
    for key in ("bf16", "fp16"):
        section = ds.get(key, {})
        if section.get("enabled") not in (None, "auto", precision == key):
            raise ConfigError(
                f"train.ds_config: {path} sets {key}.enabled={section['enabled']} but train.precision is {precision}"
            )
        ds[key] = {**section, "enabled": precision == key}
    if "optimizer" in ds:
        raise ConfigError(
            f"train.ds_config: {path} sets 'optimizer'; the optimizer comes from the run config's optim section"
        )
    params = {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps, "weight_decay": optim.weight_decay}
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if on_cpu and not offload:
        params["torch_adam"] = True  # torch's AdamW on CPU: no C++ extension to compile,
        params["fused"] = True  # and its fused kernel, a single pass over each tensor
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; keep DeepSpeed's periodic prints quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def manual_clipping(stage: int, precision: str) -> bool:
    """fp32 without ZeRO: DeepSpeed clips but does not report the norm, so the Engine clips (one pass, not two).
    (With bf16/fp16 DeepSpeed's mixed-precision optimizer clips unscaled gradients and reports the norm.)"""
    return stage == 0 and precision == "fp32"


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW groups: weight decay on matmul weights (2-D, not embeddings unless configured), none on the rest."""
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = name.startswith("tok_embeddings") or name.startswith("output")
        ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are flat: ask for the original shape
        (decay if ndim >= 2 and (optim.decay_embeddings or not is_embedding) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def peak_flops_per_device(configured: float | None) -> tuple[float, str]:
    """Peak FLOP/s of one device for MFU: configured, known from the GPU's name, or measured (CPU matmul)."""
    if configured:
        return configured, "configured"
    if accelerator_name() == "cuda":
        name = torch.cuda.get_device_name()
        for key, value in KNOWN_PEAKS.items():
            if key in name:
                return value, f"{name} dense bf16"
        log.warning("unknown GPU %r: set train.peak_flops_per_device for MFU; measuring a matmul instead", name)
    return measure_matmul_flops(), "measured fp32 matmul"


# Dense bf16 peak FLOP/s from the vendors' datasheets.
KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def measure_matmul_flops(sizes: tuple[int, ...] = (1024,), repeats: int = 10) -> float:
    """The best FLOP/s of n^3 fp32 matmuls (each n in sizes) on the current device, with the current threads."""
    device = get_accelerator().current_device_name()
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        for _ in range(repeats + 2):
            get_accelerator().synchronize()
            t0 = time.perf_counter()
            torch.mm(a, b)
            get_accelerator().synchronize()
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process instead of unmapping it (glibc only; returns whether it applied).

    glibc serves large blocks (logits, activations) with mmap and unmaps them on free, so every training step
    page-faults its large tensors in again: measured here, zero-filling a 2048 x 32000 fp32 tensor took 61 ms
    instead of 7 ms, and a whole step of bench/train.py ran ~12% slower. With mmap off and a high trim
    threshold, freed blocks are reused by the next step. Resident memory then stays at its peak, which is what
    a training process holds anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from malloc.h
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))  # -1: never trim


# ----------------------------------------------------------------------------------------------- engine
@dataclass
class StepStats:
    loss: torch.Tensor  # mean cross-entropy over this rank's micro-batches (not reduced across ranks)
    grad_norm: float | None  # global gradient norm before clipping (inf or nan: the update was skipped)
    applied: bool  # False: non-finite gradients, the weights and the optimizer state were left as they were
    z_loss: torch.Tensor | None = None  # the mean z-loss term (optim.z_loss), when on; not reduced across ranks


class Engine:
    """Two phases: `Engine(optim, train, plan)` settles the DeepSpeed config (stage, precision, batch keys), so
    that a resume point can be checked against it; `engine.build(model_cfg, seed=...)` then builds the model (under
    ZeRO-3 partitioned as its parameters are created, so no rank ever holds the whole model), initialises its
    weights and hands it to DeepSpeed. `ds` is DeepSpeed's engine: nothing outside this module calls it."""

    def __init__(self, optim: OptimConfig, train: TrainConfig, plan: BatchPlan):
        self.plan = plan
        self.precision = resolve_precision(train.precision)
        self.ds_config = build_ds_config(train.ds_config, optim=optim, plan=plan, precision=self.precision)
        self.optim_cfg = optim
        self.zero_stage = zero_stage(self.ds_config)
        self.manual_clip = manual_clipping(self.zero_stage, self.precision)
        self.compile = train.compile
        self.ds = None

    def build(
        self, model_cfg: ModelConfig, *, seed: int, load_universal: bool = False, weights: dict | None = None
    ) -> Transformer:
        """Build and initialise the model and DeepSpeed's engine around it; returns the model.
        `load_universal`: the checkpoint to load was saved by another number of ranks or ZeRO stage, and loads
        through DeepSpeed's universal format (decided by the checkpoint manager). `weights`: a full state dict to
        start from instead of the random initialisation (train.init_from; checked against the model already)."""
        if load_universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        if self.zero_stage == 3:
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = Transformer(model_cfg)
        else:
            model = Transformer(model_cfg)
        model.init_weights(seed, gather=self._gather)
        if weights is not None:
            with torch.no_grad():
                for name, p in model.named_parameters():  # a tied output head is the embedding: listed once
                    with self._gather([p]):
                        p.copy_(weights[name])
        groups = param_groups(model, self.optim_cfg)
        self.group_weight_decay = [g["weight_decay"] for g in groups]
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config
        )
        self.device = self.ds.device
        if self.compile:  # DeepSpeed's own: torch.compile of the module, its hooks left in place
            self.ds.compile()
        assert self.ds.zero_optimization_stage() == self.zero_stage
        assert self.ds.gradient_accumulation_steps() == self.plan.grad_accum
        if weights is not None and self.precision != "fp32":
            # DeepSpeed made its fp32 master weights from the bf16/fp16 copies: give them the full-precision values
            from deepspeed.utils import safe_set_full_fp32_param

            for name, p in self.ds.module.named_parameters():
                safe_set_full_fp32_param(p, weights[name].to(self.device))
        return model

    def _gather(self, params: list[torch.nn.Parameter]):
        """Make (partitioned) parameters whole for writing; rank 0's values are kept."""
        if self.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        return contextlib.nullcontext()

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    # ------------------------------------------------------------------------------------------- checkpoints
    def save(self, ckpt_dir: Path, tag: str, client_state: dict) -> None:
        """Every rank writes its part of the model and optimizer states to ckpt_dir/tag (a collective)."""
        # A plain data-parallel model: DeepSpeed's universal format needs no more than its version to convert it
        # (for resuming on another number of ranks).
        universal = {ds_constants.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds_constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        state = {**client_state, ds_constants.UNIVERSAL_CHECKPOINT_INFO: universal}
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str) -> str | None:
        """Load a checkpoint (DeepSpeed's load_checkpoint); returns its path, None if DeepSpeed found nothing."""
        path, _ = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        # ZeRO-3's universal loader gives every parameter group the first group's settings; ours differ in weight
        # decay (none on norms and embeddings), so they are set again.
        for group, weight_decay in zip(self.optimizer.param_groups, self.group_weight_decay, strict=True):
            group["weight_decay"] = weight_decay
        # It also hands one `step` tensor to every sub-group's Adam state; torch's Adam increments it in place, so
        # each step would advance it once per sub-group and skew the bias correction. Each state gets its own.
        for state in getattr(self.optimizer, "optimizer", self.optimizer).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
        return path

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-entropy of a micro-batch, and the z-loss term (optim.z_loss) when it is on."""
        tokens = torch.as_tensor(batch, device=self.device)
        logits = self.ds(tokens[:, :-1]).flatten(0, 1).float()  # (micro * seq, vocab)
        ce = F.cross_entropy(logits, tokens[:, 1:].flatten())
        if not self.optim_cfg.z_loss:
            return ce, None
        return ce, self.optim_cfg.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()

    def train_step(self, micro_batches: list, lr: float) -> StepStats:
        if len(micro_batches) != self.plan.grad_accum:
            raise ValueError(f"{len(micro_batches)} micro-batches, the engine accumulates {self.plan.grad_accum}")
        self.set_lr(lr)
        self.ds.train()
        total = torch.zeros((), device=self.device)
        z_total = torch.zeros((), device=self.device) if self.optim_cfg.z_loss else None
        grad_norm = None
        for batch in micro_batches:
            loss, z = self._loss(batch)
            self.ds.backward(loss if z is None else loss + z)
            if self.manual_clip and self.ds.is_gradient_accumulation_boundary():
                # gradients are averaged across ranks by now; clip_grad_norm_ returns the norm before clipping
                clip = self.optim_cfg.grad_clip
                max_norm = clip if clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.ds.module.parameters(), max_norm, foreach=True))
                if not math.isfinite(grad_norm):  # torch's AdamW skips parameters without a gradient: no update
                    for p in self.ds.module.parameters():
                        p.grad = None
            self.ds.step()
            total += loss.detach()
            if z is not None:
                z_total += z.detach()
        if not self.manual_clip:
            # ZeRO skips the update itself when the norm is not finite (and reports inf)
            norm = self.ds.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        applied = grad_norm is None or math.isfinite(grad_norm)
        z_mean = z_total / len(micro_batches) if z_total is not None else None
        return StepStats(loss=total / len(micro_batches), grad_norm=grad_norm, applied=applied, z_loss=z_mean)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """The model's logits for a batch of token ids, in eval mode (every rank together under ZeRO-3); `kwargs`
        go to the model's forward (a KV cache when generating)."""
        self.ds.eval()
        return self.ds(torch.as_tensor(tokens).to(self.device), **kwargs)

    def state_bytes(self) -> dict[str, int]:
        """The model-state bytes this rank holds (pretrain/plan.py `held_state_bytes`)."""
        from pretrain.plan import held_state_bytes

        return held_state_bytes(self.ds.module, self.optimizer)

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone().float()
        if self.plan.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.plan.world_size
        return value


# ----------------------------------------------------------------------------------------------- checkpoint files
# DeepSpeed's converter, run as a script with every torch.load in it (its workers' too) restricted as the trainer's
# own loads are (pretrain.checkpoint.restricted_unpickling)
RESTRICTED_CONVERTER = """
import runpy, sys
sys.path.insert(0, sys.argv.pop(1))
from pretrain.checkpoint import restricted_unpickling
with restricted_unpickling():
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
"""


def convert_to_universal(src: Path, out: Path) -> None:
    """DeepSpeed's conversion of a ZeRO checkpoint directory to its universal format (in a subprocess, one worker,
    its unpickling restricted); raises RuntimeError with the tail of its output when it fails."""
    cmd = [
        sys.executable, "-c", RESTRICTED_CONVERTER, str(Path(__file__).resolve().parents[1]),
        "--input_folder", str(src), "--output_folder", str(out), "--num_extract_workers", "1",
        "--num_merge_workers", "1",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent())
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])


def die_with_parent():
    """A preexec_fn that has the child killed (SIGKILL) when its parent dies (Linux), so that no converter outlives
    its run; None elsewhere. libc is loaded here, in the parent: the child only makes the call."""
    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def consolidated_state_dict(ckpt_dir: Path, tag: str, stage: int) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict from a checkpoint of ZeRO stage `stage` (on CPU, one process). ZeRO-0's
    file holds only tensors and plain values: it is read with weights_only=True. DeepSpeed's zero_to_fp32 unpickles
    the ZeRO files fully (the caller scans them first: checkpoint.check_pickles)."""
    if stage == 0:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
