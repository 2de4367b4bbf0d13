"""The run configuration: typed sections, loaded from YAML, overridden by dotted `key=value` arguments.

    cfg = load_config("launch/configs/demo.yaml", ["train.max_steps=100", "optim.lr=3e-4"])

Precedence is command line > YAML file > the defaults below. Every key is checked: an unknown key, a value of the
wrong type or outside its range is a `ConfigError` that names the key (`optim.lr: ...`). Functions receive the
section they need (`Transformer(cfg.model)`), never the whole run config.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.errors import BadInput


class ConfigError(BadInput, ValueError):
    """A configuration key or value that is not acceptable; the message starts with the dotted key."""


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: the tokenizer's vocab size; the embedding is padded (pad_vocab_multiple)
    pad_vocab_multiple: int = 64  # embedding rows are rounded up to a multiple of this (fast matmuls)
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # grouped-query attention; None: n_heads (multi-head attention)
    ffn_dim: int | None = None  # SwiGLU hidden size; None: 8/3 * d_model rounded up to a multiple of 256
    seq_len: int = 2048  # tokens per training sample (and the longest context)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # std of weights; residual output projections use init_std / sqrt(2 * n_layers)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more compute
    # attention stays inside each document of a packed window: a token never attends past an end-of-document token
    document_masking: bool = False
    document_positions: bool = False  # with document_masking: rotary positions restart at 0 in every document
    eod_id: int | None = None  # the end-of-document id document_masking looks for; None: the tokenizer's


@dataclass
class DatasetSpec:
    path: str  # a dataset directory from `data_prep tokenize` (with manifest.json), or a Megatron .bin/.idx prefix
    weight: float = 1.0  # share of training samples drawn from it (normalised over all datasets)


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    tokenizer: str = ""  # the sentencepiece .model the shards were made with (checked against their manifests)
    seed: int = 1234  # the data order is a pure function of (seed, sample number)
    val_datasets: list[DatasetSpec] | None = None  # None: the val split of each dataset directory
    # global sample numbers left out of training, as [start, stop) ranges (launch/inspect_step.py names them); the
    # rest of the order is unchanged. A resumed run may add ranges beyond the samples it has trained on.
    skip_samples: list[list[int]] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # learning rate at the end of the decay
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = 2000  # linear warmup from 0 to lr
    decay_steps: int | None = None  # steps from the end of warmup to min_lr; None: until train.max_steps
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of decay_steps decays linearly, before it lr is flat
    weight_decay: float = 0.1  # applied to matmul weights only, never to norms or biases
    decay_embeddings: bool = False  # also decay the embedding (and an untied output head)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    # z-loss: this coefficient times the mean squared log of the softmax normaliser (logsumexp of the logits) is
    # added to the loss, keeping the output logits from drifting (PaLM uses 1e-4); 0: off
    z_loss: float = 0.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"  # resolved config, DeepSpeed JSON and TensorBoard logs go here
    ds_config: str = "ds_configs/zero1.json"  # engine settings only; batch keys are derived and injected
    global_batch_seqs: int | None = None  # sequences per optimizer step, over all ranks (or global_batch_tokens)
    global_batch_tokens: int | None = None  # tokens per optimizer step; must be a multiple of model.seq_len
    micro_batch_seqs: int = 1  # sequences per forward/backward on one rank; accumulation is derived
    max_steps: int = 1000
    max_tokens: int | None = None  # also stop once this many tokens were trained on
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0  # model initialisation
    # start from these weights instead of a random initialisation (when there is no checkpoint to resume): a state
    # dict file (launch/export.py from-hf, launch/checkpoints.py consolidate) or an exported Hugging Face Llama folder
    init_from: str | None = None
    eval_every: int = 500  # steps between evaluations; 0 disables
    eval_batches: int = 20  # global batches of the validation set per evaluation
    peak_flops_per_device: float | None = None  # for MFU; None: known GPUs by name, on CPU a matmul measured at start
    threads: int | None = None  # torch intra-op threads per process; None: torch's default
    # torch.compile the model (through DeepSpeed's engine.compile; the first steps are slower while it compiles;
    # on a CPU it needs a C++ compiler)
    compile: bool = False
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # finish the step, save, exit 3
    stop_grace_seconds: float = 120.0  # after a stop signal, exit (saved or not) within this many seconds
    max_wall_time: float | None = None  # seconds: save and exit 3 before the run has been going this long
    stop_at_step: int | None = None  # save and exit 3 after this step, as if preempted (split a run into jobs)
    max_bad_steps: int = 5  # consecutive steps with non-finite loss/gradients (each skipped) before the run stops
    orphan_grace_seconds: float = 30.0  # launcher gone: save first if a step and a save fit in this, else exit now
    # a step whose loss is above the running mean by this many running standard deviations is logged as a spike,
    # with the global samples it trained on (launch/inspect_step.py shows them); 0: off (a step's loss is then not
    # averaged over the ranks at steps that do not log)
    spike_threshold: float = 6.0
    spike_window: int = 100  # steps the running mean and variance of the loss reach back (exponential averages)
    # [first, last]: run torch.profiler over these steps (as logged) and write a trace to run_dir/tensorboard/profile
    # (pretrain/profiler.py); None: off
    profile_steps: list[int] | None = None
    profile_ranks: list[int] = field(default_factory=lambda: [0])  # the ranks that profile
    lock_stale_seconds: float = 300.0  # a run directory lock held from another host without heartbeat for this long
    # is taken over (on the same host a dead holder is seen at once)


@dataclass
class CheckpointConfig:
    save_every: int = 1000  # steps between checkpoints; one is also saved at the end and on a stop (0: only those)
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted after a save)
    keep_every: int = 0  # also keep, permanently, checkpoints whose step is a multiple of this; 0: none
    # auto: the newest valid checkpoint of run_dir, if any (a run directory whose checkpoints are all invalid is
    # refused: start it over with `launch/checkpoints.py set-aside`); none: start fresh in a run directory without
    # checkpoints; or a tag / checkpoint path
    resume: str = "auto"
    allow_data_change: bool = False  # resume although the training data (manifests, blend, seq_len, seed) changed
    checksums: bool = True  # CRC-32 of every file in the completion record, verified before resuming


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between console lines and TensorBoard scalars
    tensorboard: bool = True


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# Range checks, by dotted key: (predicate, what it must be).
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, "non-negative")
CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "model.vocab_size": POSITIVE,
    "model.n_kv_heads": POSITIVE,
    "model.ffn_dim": POSITIVE,
    "model.rope_theta": POSITIVE,
    "model.norm_eps": POSITIVE,
    "model.d_model": POSITIVE,
    "model.n_layers": POSITIVE,
    "model.n_heads": POSITIVE,
    "model.seq_len": POSITIVE,
    "model.pad_vocab_multiple": POSITIVE,
    "model.init_std": POSITIVE,
    "optim.z_loss": NON_NEGATIVE,
    "train.spike_threshold": NON_NEGATIVE,
    "train.spike_window": POSITIVE,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.decay_steps": POSITIVE,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "optim.grad_clip": NON_NEGATIVE,
    "optim.wsd_decay_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "train.micro_batch_seqs": POSITIVE,
    "train.global_batch_seqs": POSITIVE,
    "train.global_batch_tokens": POSITIVE,
    "train.max_tokens": POSITIVE,
    "train.peak_flops_per_device": POSITIVE,
    "train.threads": POSITIVE,
    "train.max_steps": POSITIVE,
    "train.eval_every": NON_NEGATIVE,
    "train.eval_batches": POSITIVE,
    "logging.log_every": POSITIVE,
    "checkpoint.save_every": NON_NEGATIVE,
    "checkpoint.keep_last": (lambda v: v >= 1, "at least 1"),
    "checkpoint.keep_every": NON_NEGATIVE,
    "train.stop_grace_seconds": POSITIVE,
    "train.max_wall_time": POSITIVE,
    "train.stop_at_step": POSITIVE,
    "train.max_bad_steps": POSITIVE,
    "train.orphan_grace_seconds": POSITIVE,
    "train.lock_stale_seconds": (lambda v: v >= 30, "at least 30 (NFS attribute caches, clocks of other hosts)"),
}


def _convert(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (converting where it is lossless) or raise naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not any of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp is DatasetSpec:
            value = {"path": value}  # a bare path is a dataset of weight 1
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp}")


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _convert(key, v, hints[k])
    obj = cls(**kwargs)
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        value = getattr(obj, name)
        if key in CHECKS and value is not None and not CHECKS[key][0](value):
            raise ConfigError(f"{key}: {value!r} must be {CHECKS[key][1]}")
    return obj


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` strings -> (key, value); values are parsed as YAML (numbers, booleans, lists, null)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item}: an override is key=value, e.g. train.max_steps=100")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse {raw!r} ({e})") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = _build(RunConfig, tree)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that span keys."""
    m, t = cfg.model, cfg.train
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.n_heads: {m.n_heads} does not divide model.d_model {m.d_model}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model.n_heads: head dim {m.d_model // m.n_heads} must be even for rotary embeddings")
    if m.document_positions and not m.document_masking:
        raise ConfigError("model.document_positions: needs model.document_masking (positions restart per document)")
    kv = m.n_kv_heads or m.n_heads
    if kv <= 0 or m.n_heads % kv:
        raise ConfigError(f"model.n_kv_heads: {kv} must divide model.n_heads {m.n_heads}")
    if (t.global_batch_seqs is None) == (t.global_batch_tokens is None):
        raise ConfigError(
            "train.global_batch_seqs: set exactly one of train.global_batch_seqs, train.global_batch_tokens"
        )
    if t.global_batch_tokens is not None and t.global_batch_tokens % m.seq_len:
        raise ConfigError(
            f"train.global_batch_tokens: {t.global_batch_tokens} is not a multiple of model.seq_len {m.seq_len}"
        )
    if not cfg.data.datasets:
        raise ConfigError("data.datasets: no dataset given")
    p = t.profile_steps
    if p is not None and (len(p) != 2 or not 1 <= p[0] <= p[1]):
        raise ConfigError(f"train.profile_steps: {p} is not [first, last] with 1 <= first <= last")
    for i, r in enumerate(cfg.data.skip_samples):
        if len(r) != 2 or not 0 <= r[0] < r[1]:
            raise ConfigError(f"data.skip_samples[{i}]: {r} is not a range [start, stop) with 0 <= start < stop")
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer: no tokenizer given")
    for key in ("datasets", "val_datasets"):
        for i, d in enumerate(getattr(cfg.data, key) or []):
            if d.weight <= 0:
                raise ConfigError(f"data.{key}[{i}].weight: {d.weight} must be positive")
    for i, name in enumerate(cfg.train.stop_signals):
        if not isinstance(getattr(signal, name, None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"train.stop_signals[{i}]: {name!r} is not a signal that can be caught")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr: {cfg.optim.min_lr} is above optim.lr {cfg.optim.lr}")


@dataclass(frozen=True)
class BatchPlan:
    """The run's batch arithmetic, resolved once (`BatchPlan.resolve`) and handed to everything that needs it:
    the engine (DeepSpeed's batch keys), the data (which samples each rank reads), the loop (tokens, steps)."""

    global_batch: int  # sequences per optimizer step, all ranks
    micro_batch: int  # sequences per forward/backward on one rank
    world_size: int
    seq_len: int

    @classmethod
    def resolve(cls, train: TrainConfig, *, seq_len: int, world_size: int) -> BatchPlan:
        g = train.global_batch_seqs if train.global_batch_seqs is not None else train.global_batch_tokens // seq_len
        micro = train.micro_batch_seqs
        per_rank, rem = divmod(g, world_size)
        if rem or per_rank % micro:
            raise ConfigError(
                f"train.global_batch_seqs: a global batch of {g} sequences does not split into {world_size} "
                f"rank(s) x micro-batches of {micro} (train.micro_batch_seqs); make it a multiple of {world_size * micro}"
            )
        return cls(global_batch=g, micro_batch=micro, world_size=world_size, seq_len=seq_len)

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world_size

    @property
    def grad_accum(self) -> int:
        return self.per_rank // self.micro_batch

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def rank_range(self, step: int, rank: int) -> tuple[int, int]:
        """The global sample numbers [start, stop) rank `rank` consumes at `step`."""
        start = step * self.global_batch + rank * self.per_rank
        return start, start + self.per_rank

    def total_steps(self, train: TrainConfig) -> int:
        """Optimizer steps of the run: train.max_steps, or fewer if train.max_tokens is reached first."""
        if train.max_tokens is None:
            return train.max_steps
        return min(train.max_steps, math.ceil(train.max_tokens / self.tokens_per_step))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def section_from_dict(cls, values: dict, key: str):
    """A config section (e.g. ModelConfig) from a dict, checked as the YAML is (errors name `key`.field)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping of {cls.__name__} fields, got {values!r}")
    return _build(cls, values, key)
