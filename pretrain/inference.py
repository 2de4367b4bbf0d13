"""A trained model, ready for generation and evaluation, from a run directory or an exported folder.

    loaded = load_model("runs/demo")                      # the newest valid checkpoint (any ZeRO stage)
    loaded = load_model("runs/demo", tag="step_00000300")
    loaded = load_model("exports/demo-hf")                # a Hugging Face Llama folder (launch/export.py)
    loaded.model(tokens), loaded.tokenizer, loaded.cfg

One process, one device: the accelerator DeepSpeed picks (a GPU if there is one, else the CPU); fp32 on CPU, bf16
on a GPU unless told otherwise. The checkpoint's weights are consolidated to fp32 (pretrain.checkpoint.consolidate,
which refuses pickles our saves do not contain) and its model config read from its meta.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain import checkpoint
from pretrain.config import ConfigError, ModelConfig, section_from_dict
from pretrain.errors import BadInput
from pretrain.model import Transformer
from pretrain.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LoadError(BadInput, ValueError):
    """A source that is not a run directory with a valid checkpoint nor an exported folder; the message names it."""


@dataclass
class Loaded:
    model: Transformer  # in eval mode, on `device`
    tokenizer: Tokenizer
    cfg: ModelConfig
    source: str  # what was loaded: the checkpoint directory or the exported folder
    device: torch.device
    add_bos: bool = False  # its training documents began with the bos id (data_prep tokenize --add-bos)


def default_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def is_exported(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_model(
    source: str | Path,
    *,
    tag: str | None = None,
    tokenizer: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | None = None,
) -> Loaded:
    """The model of a run directory's checkpoint (newest valid, or `tag`) or of an exported folder, with its
    tokenizer (the run's data.tokenizer or the folder's tokenizer.model, unless `tokenizer` names one).
    `dtype`: fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on a GPU)."""
    path = Path(source)
    if not path.is_dir():
        raise LoadError(f"{path}: not a directory (a run directory or an exported model folder)")
    if is_exported(path):
        from pretrain.export import read_folder

        if tag is not None:
            raise LoadError(f"{path}: an exported folder has no checkpoint tags (--tag {tag})")
        cfg, state, folder_tokenizer = read_folder(path)
        tokenizer = tokenizer or folder_tokenizer
        where = str(path)
        add_bos = _folder_adds_bos(path)
        if tokenizer is None:
            raise LoadError(f"{path}: no tokenizer.model in the folder; name one with --tokenizer")
    else:
        cfg, state, data, where = read_checkpoint(path, tag)
        tokenizer = tokenizer or data.get("tokenizer")
        add_bos = documents_start_with_bos(data)
    try:
        tok = Tokenizer(tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise LoadError(f"{e} (the tokenizer of {where}; name another with --tokenizer)") from None
    if tok.vocab_size != cfg.vocab_size:
        raise LoadError(
            f"{tok.path}: {tok.vocab_size} pieces, but the model of {where} was trained with a vocab of "
            f"{cfg.vocab_size}: not its tokenizer"
        )
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = "fp32" if device.type == "cpu" else "bf16"
    if dtype not in DTYPES:
        raise LoadError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    model = build_model(cfg, state, where)
    model.to(device=device, dtype=DTYPES[dtype]).eval()
    log.info("loaded %s: %s parameters, %s on %s", where, f"{model.num_params():,}", dtype, device)
    return Loaded(model=model, tokenizer=tok, cfg=cfg, source=where, device=device, add_bos=add_bos)


def _folder_adds_bos(path: Path) -> bool:
    """Whether an exported folder's tokenizer begins a text with bos (tokenizer_config.json's add_bos_token)."""
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text()).get("add_bos_token", False))
    except (OSError, ValueError, AttributeError):
        return False


def documents_start_with_bos(data: dict) -> bool:
    """Whether the run's training documents began with the bos id (data_prep tokenize --add-bos), as the
    manifests of its datasets say; False where no manifest says so."""
    from pretrain.shards import read_manifest

    flags = set()
    for spec in data.get("datasets") or []:
        try:
            flags.add(bool(read_manifest(spec["path"] if isinstance(spec, dict) else spec)["settings"]["add_bos"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a bare Megatron prefix, or a dataset that has moved: it does not say
    if len(flags) > 1:
        raise LoadError("data.datasets: some datasets begin documents with the bos id and some do not")
    return flags == {True}


def read_checkpoint(path: str | Path, tag: str | None = None) -> tuple[ModelConfig, dict, dict, str]:
    """A run directory's checkpoint (newest valid, or `tag`): its model config, fp32 weights, the run's data section
    (data.tokenizer, data.datasets) and the checkpoint directory, as a string for messages."""
    path = Path(path)
    ckpt_dir = checkpoint.checkpoints_of(path)
    if not ckpt_dir.is_dir():
        raise LoadError(f"{path}: neither a run directory (no checkpoints/) nor an exported folder (no config.json)")
    tag = tag or checkpoint.newest_valid(ckpt_dir)
    if tag is None:
        raise LoadError(f"{ckpt_dir}: no valid checkpoint")
    problem = checkpoint.validate(ckpt_dir, tag)
    if problem:
        raise LoadError(problem)
    meta = checkpoint.read_meta(ckpt_dir, tag)
    try:
        cfg = section_from_dict(ModelConfig, dict(meta.config.get("model", {})), "model")
    except ConfigError as e:
        raise LoadError(f"{ckpt_dir / tag / checkpoint.META}: {e}") from None
    state = checkpoint.consolidate(ckpt_dir, tag)
    return cfg, state, meta.config.get("data", {}), str(ckpt_dir / tag)


def weights_problem(state: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, str | None]:
    """`state` as the model of `cfg` takes it (a tied output head is the embedding: dropped), and what is wrong with
    it (a tensor missing, unexpected or of another shape), or None."""
    from pretrain.export import expected_shapes

    shapes = expected_shapes(cfg)
    state = dict(state)
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
        shapes.pop("output.weight", None)
    missing, unexpected = sorted(set(shapes) - set(state)), sorted(set(state) - set(shapes))
    if missing or unexpected:
        return state, "not this model's weights" + (f"; missing {', '.join(missing[:5])}" if missing else "") + (
            f"; unexpected {', '.join(unexpected[:5])}" if unexpected else ""
        )
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            return state, f"{name} has shape {tuple(state[name].shape)}, the model {shape}"
    return state, None


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str = "the state dict") -> Transformer:
    """A Transformer holding exactly `state`'s weights (a tied output head may be missing from it)."""
    cfg.activation_checkpointing = False  # training only
    state, problem = weights_problem(state, cfg)
    if problem:
        raise LoadError(f"{where}: {problem}")
    model = Transformer(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not cfg.tie_embeddings)
    return model


def initial_weights(path: str | Path, cfg: ModelConfig, key: str = "train.init_from") -> dict[str, torch.Tensor]:
    """The weights a run starts from (`train.init_from`): a state dict file or an exported folder, checked against
    the run's model config (every tensor present with the model's shape); errors name `key` and the file."""
    path = Path(path)
    if path.is_dir():
        if not is_exported(path):
            raise ConfigError(f"{key}: {path} is a directory without config.json (not an exported model folder)")
        from pretrain.export import read_folder

        _, state, _ = read_folder(path)
    elif path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - anything that is not a plain state dict
            raise ConfigError(f"{key}: {path} is not a state dict of tensors ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"{key}: {path} is not a state dict of tensors")
    else:
        raise ConfigError(f"{key}: {path} not found")
    state, problem = weights_problem(state, cfg)
    if problem:
        raise ConfigError(f"{key}: {path}: {problem} (this run's model.* settings)")
    return {k: v.float() for k, v in state.items()}
