"""Will a run fit, and how long will it take: a plan from the config alone, before any GPU is touched.

    plan = make_plan(cfg, nodes=8, gpus_per_node=8, gpu="H100", mfu=0.4)     # launch/plan.py prints it

- Parameters and FLOPs per token come from the model itself, built on PyTorch's meta device (no memory).
- Model states per GPU (weights, gradients, optimizer states) for each ZeRO stage. Stages 2 and 3 are DeepSpeed's
  own estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`: mixed
  precision, Adam); stages 0 and 1 use the same byte counts per parameter (`state_breakdown`): 16-bit weights (2)
  and gradients (2), fp32 gradients (4), fp32 master weights (4) and Adam's two moments (8), split over the
  data-parallel ranks as the stage says (the breakdown's totals equal DeepSpeed's for stages 2 and 3). In fp32
  (this project's CPU default): weights 4, gradients 4, Adam 8, and under ZeRO-1/2 DeepSpeed's fp32 master
  partition 4.
- Activations per GPU for one micro-batch, with and without activation checkpointing (`activation_bytes`).
- Buffers the DeepSpeed config asks for: ZeRO's reduce and all-gather buckets, ZeRO-3's prefetch bucket.
- Wall time at a given MFU on a named GPU (the dense bf16 peaks of `pretrain.engine.KNOWN_PEAKS`, which the
  trainer's MFU uses too).

The trainer logs, at start, the model-state bytes its rank actually holds (`held_state_bytes`), so a plan can be
checked against a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.config import BatchPlan, ModelConfig, RunConfig
from pretrain.model import Transformer, ffn_dim, numel

GIB = 2**30
STAGES = (0, 1, 2, 3)
# DeepSpeed's defaults for the buffers a ds config may leave out (deepspeed/runtime/zero/config.py)
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
               "stage3_prefetch_bucket_size": 50_000_000}  # fmt: skip


@dataclass
class ModelShape:
    params: int  # all parameters, a tied embedding once
    largest_layer: int  # parameters of the largest module (ZeRO-3 gathers it whole)
    flops_per_token: int  # training FLOPs per token (pretrain.model.Transformer.flops_per_token)


def model_shape(cfg: ModelConfig) -> ModelShape:
    """The model's sizes, from the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg)
    largest = max(sum(numel(p) for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelShape(model.num_params(), largest, model.flops_per_token(cfg.seq_len))


def state_breakdown(shape: ModelShape, stage: int, gpus: int, *, precision: str = "bf16") -> dict[str, int]:
    """Bytes per GPU of `weights`, `gradients` and `optimizer` states (fp32 master weights and Adam's moments) under
    ZeRO `stage` over `gpus` GPUs, as DeepSpeed keeps them. Mixed precision: 16-bit weights (2) and gradients (2),
    fp32 gradient partitions (4), master weights (4), moments (8). fp32: weights 4 and gradients 4, moments 8, and
    under ZeRO-1 and 2 DeepSpeed still keeps an fp32 master copy of each rank's partition (4). ZeRO-3 also gathers
    the largest layer whole while it computes (counted with the weights)."""
    p, n = shape.params, gpus
    if precision == "fp32":
        master = 4 if stage in (1, 2) else 0  # ZeRO-3's fp32 partitions are the weights' own (measured)
        weights = 4 * p // n + 4 * shape.largest_layer if stage == 3 else 4 * p
        grads = 4 * p // n if stage >= 2 else 4 * p
        return {"weights": weights, "gradients": grads, "optimizer": (master + 8) * p // (1 if stage == 0 else n)}
    weights = 2 * p // n + 4 * shape.largest_layer if stage == 3 else 2 * p
    # 16-bit gradients and their fp32 partition; ZeRO-3's partitions as DeepSpeed's estimator counts them (18 bytes
    # per parameter in all, over the ranks)
    grads = {0: 6 * p, 1: 2 * p + 4 * p // n, 2: 6 * p // n, 3: 4 * p // n}[stage]
    return {"weights": weights, "gradients": grads, "optimizer": 12 * p // (1 if stage == 0 else n)}


def state_bytes(shape: ModelShape, stage: int, gpus: int, *, nodes: int = 1, precision: str = "bf16") -> int:
    """Model-state bytes per GPU under ZeRO `stage` over `gpus` GPUs in all: for stages 2 and 3 in mixed precision
    DeepSpeed's own estimators (without optimizer or parameter offload), else `state_breakdown`'s sum."""
    if precision != "fp32" and stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(shape.params, gpus // nodes, nodes, cpu_offload=False)[1]
    if precision != "fp32" and stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(
            shape.params, shape.largest_layer, gpus // nodes, nodes, cpu_offload=False, cpu_offload_params=False,
            zero_init=True,
        )[1]  # fmt: skip
    return sum(state_breakdown(shape, stage, gpus, precision=precision).values())


def activation_bytes(cfg: ModelConfig, micro_batch: int, *, precision: str, checkpointing: bool) -> int:
    """Activations kept for the backward pass of one micro-batch on one GPU (an estimate from our model's code).

    Per token and layer the backward needs: the block's input, the two norms' inputs and outputs, q and the k/v
    heads, the attention output, the feed-forward's gate and up projections, silu(gate) and the product: 7 d_model
    + 2 kv_dim + 4 ffn_dim elements (attention itself keeps O(seq) with a fused kernel; the math kernel, which CPUs
    and masked attention may use, also keeps the seq x seq scores per head). With activation checkpointing only each
    block's input is kept, and one block's full set while it is recomputed. The output head keeps the logits and
    their fp32 copy for the loss.
    """
    width = 4 if precision == "fp32" else 2
    tokens = micro_batch * cfg.seq_len
    kv = (cfg.n_kv_heads or cfg.n_heads) * (cfg.d_model // cfg.n_heads)
    per_layer = (7 * cfg.d_model + 2 * kv + 4 * ffn_dim(cfg)) * tokens * width
    vocab = (cfg.vocab_size + cfg.pad_vocab_multiple - 1) // cfg.pad_vocab_multiple * cfg.pad_vocab_multiple
    head = tokens * vocab * (width + 4) + tokens * cfg.d_model * width  # logits, their fp32 copy, the final norm
    if checkpointing:
        return cfg.n_layers * tokens * cfg.d_model * width + per_layer + head
    return cfg.n_layers * per_layer + head


def buffer_bytes(ds: dict, stage: int, *, precision: str) -> int:
    """The communication buckets the DeepSpeed config asks for (elements of the gradient dtype)."""
    zero = {**DS_DEFAULTS, **ds.get("zero_optimization", {})}
    width = 4 if precision == "fp32" else 2
    if stage in (1, 2):
        return (zero["reduce_bucket_size"] + zero["allgather_bucket_size"]) * width
    if stage == 3:
        return (zero["reduce_bucket_size"] + zero["stage3_prefetch_bucket_size"]) * width
    return 0


@dataclass
class Plan:
    shape: ModelShape
    gpus: int
    nodes: int
    precision: str
    gpu: str
    gpu_memory: int  # bytes
    peak_flops: float  # per GPU
    mfu: float
    plan: BatchPlan
    steps: int
    stage: int  # the stage of the run's ds config
    checkpointing: bool
    states: dict[int, int] = field(default_factory=dict)  # bytes per GPU, per ZeRO stage
    activations: dict[bool, int] = field(default_factory=dict)  # bytes per GPU, without / with checkpointing
    buffers: dict[int, int] = field(default_factory=dict)  # bytes per GPU, per stage

    @property
    def tokens(self) -> int:
        return self.steps * self.plan.tokens_per_step

    @property
    def seconds(self) -> float:
        return self.tokens * self.shape.flops_per_token / (self.gpus * self.peak_flops * self.mfu)

    def total(self, stage: int, checkpointing: bool) -> int:
        return self.states[stage] + self.activations[checkpointing] + self.buffers[stage]


# Memory of the GPUs KNOWN_PEAKS names (bytes), from the vendors' datasheets (the largest variant of each).
GPU_MEMORY = {"H100": 80 * GIB, "H200": 141 * GIB, "A100": 80 * GIB, "L40S": 48 * GIB, "A10G": 24 * GIB, "L4": 24 * GIB}


def make_plan(
    cfg: RunConfig, ds: dict, *, nodes: int, gpus_per_node: int, gpu: str, mfu: float, precision: str
) -> Plan:
    """The plan of `cfg` (model.vocab_size set) with DeepSpeed config `ds`, on nodes x gpus_per_node `gpu`s."""
    from pretrain.engine import KNOWN_PEAKS, zero_stage

    if gpu not in KNOWN_PEAKS:
        raise ValueError(f"--gpu: {gpu!r} is not one of {', '.join(KNOWN_PEAKS)}")
    gpus = nodes * gpus_per_node
    plan = BatchPlan.resolve(cfg.train, seq_len=cfg.model.seq_len, world_size=gpus)
    steps = plan.total_steps(cfg.train)
    shape = model_shape(cfg.model)
    stage = zero_stage(ds)
    out = Plan(shape, gpus, nodes, precision, gpu, GPU_MEMORY[gpu], KNOWN_PEAKS[gpu], mfu, plan, steps, stage,
               cfg.model.activation_checkpointing)  # fmt: skip
    for s in STAGES:
        out.states[s] = state_bytes(shape, s, gpus, nodes=nodes, precision=precision)
        out.buffers[s] = buffer_bytes(ds, s, precision=precision)
    for ckpt in (False, True):
        out.activations[ckpt] = activation_bytes(cfg.model, plan.micro_batch, precision=precision, checkpointing=ckpt)
    return out


def held_state_bytes(module: torch.nn.Module, optimizer) -> dict[str, int]:
    """The bytes of model states this rank holds now: `weights` (the module's parameters, or under ZeRO-3 this
    rank's partitions of them), `gradients` (the module's), and `optimizer`: the parameters the inner torch optimizer
    updates when they are not the module's (DeepSpeed's fp32 master partitions) with their gradients, and its state
    (Adam's moments). Communication buckets are not model states. A storage is counted once."""
    seen: set[int] = set()

    def size(tensors) -> int:
        total = 0
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total

    params = list(module.parameters())
    weights = size(getattr(p, "ds_tensor", p) for p in params)
    grads = size(p.grad for p in params)
    inner = optimizer
    while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
        inner = inner.optimizer  # DeepSpeed's ZeRO optimizers wrap the torch one
    held = [p for g in inner.param_groups for p in g["params"]]
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"weights": weights, "gradients": grads, "optimizer": size(held + [p.grad for p in held] + states)}
