"""Export a trained model to a Hugging Face Llama folder, and read one back.

    hf_config, hf_state = to_llama(state, cfg, bos_id=1, eos_id=2, pad_id=3)    # our names -> LlamaForCausalLM's
    cfg, state = from_llama(hf_config, hf_state)                                # the exact inverse
    write_folder(state, cfg, "tok/sp.model", "export/demo", dtype="bfloat16")  # config, weights, tokenizer
    cfg, state, tokenizer_model = read_folder("export/demo")                   # ours or any Llama folder

Our model is a Llama: the fused q/k/v (`wqkv`) and gate/up (`w13`) matmuls are split into Llama's separate
projections; rotary embeddings use the same rotate-half convention, so no weight is permuted. The embedding keeps
its padded rows (`padded_vocab`): the folder's vocab_size is the padded size, so a round trip is exact; the
tokenizer never produces a padded id and generation_config.json suppresses them in `generate`.

The tokenizer is written as a `tokenizers` JSON (tokenizer.json, PreTrainedTokenizerFast) computed from the
sentencepiece model, which gives the ids sentencepiece gives on any text, leading spaces included; the
sentencepiece file is copied beside it as tokenizer.model. One standard difference: a literal "</s>" (or "<s>",
"<unk>", "<pad>") inside a text is that special token for Hugging Face, while sentencepiece encodes it as text.
A training document is the tokenizer's ids of its text followed by the eos id (data_prep tokenize; the bos id
first only with --add-bos), so AutoTokenizer adds nothing by default (add_bos=True when the data had bos ids).

Folders are written in a temporary folder beside the output and renamed into place once complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from pretrain.config import ModelConfig
from pretrain.errors import BadInput
from pretrain.fileutil import fsync_dir
from pretrain.model import Transformer, ffn_dim, padded_vocab


class ExportError(BadInput, ValueError):
    """A model, config key, file or folder that cannot be exported or read; the message names it."""


# ModelConfig fields and how they reach a Llama config. A field missing from both sets is refused by `to_llama`
# until someone maps it: a new model option must not be exported as if it did not exist.
MAPPED_FIELDS = {
    "vocab_size": "vocab_size (padded)",
    "pad_vocab_multiple": "vocab_size (padded)",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "ffn_dim": "intermediate_size",
    "seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
}
# document masking changes nothing for one document, which is what a Llama model is given
TRAINING_ONLY_FIELDS = {"init_std", "activation_checkpointing", "document_masking", "document_positions", "eod_id"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # as Hugging Face's save_pretrained ("5GB")
RECORD_KEY = "pretrain_model_config"  # our full ModelConfig, kept in config.json so a round trip is exact
SPIECE_UNDERLINE = "\u2581"


# --- weights and config ----------------------------------------------------------------------------------------


def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    kv = cfg.n_kv_heads or cfg.n_heads
    return cfg.n_heads, kv, cfg.d_model // cfg.n_heads


def _check_exportable(cfg: ModelConfig) -> None:
    for f in dataclasses.fields(cfg):
        if f.name not in MAPPED_FIELDS and f.name not in TRAINING_ONLY_FIELDS:
            raise ExportError(
                f"model.{f.name}: has no Hugging Face Llama equivalent that this exporter knows "
                "(map it in pretrain/export.py MAPPED_FIELDS or TRAINING_ONLY_FIELDS)"
            )
    if cfg.vocab_size is None:
        raise ExportError("model.vocab_size: not set (the tokenizer's vocab size)")
    if cfg.d_model % cfg.n_heads:
        raise ExportError(f"model.n_heads: {cfg.n_heads} does not divide model.d_model {cfg.d_model}")
    n_heads, kv, _ = _dims(cfg)
    if n_heads % kv:
        raise ExportError(f"model.n_kv_heads: {kv} does not divide model.n_heads {n_heads}")


def llama_config(cfg: ModelConfig, *, bos_id=None, eos_id=None, pad_id=None, dtype: str = "float32") -> dict:
    """The config.json of LlamaForCausalLM for `cfg` (loads in transformers 4.45+ and 5.x: rope_theta for 4.x,
    rope_parameters for 5.x)."""
    _check_exportable(cfg)
    n_heads, kv, head_dim = _dims(cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": padded_vocab(cfg),
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_dim(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        RECORD_KEY: dataclasses.asdict(cfg),
    }


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's names and shapes, as the model builds them (output.weight too when tied: the model's
    state_dict holds both)."""
    with torch.device("meta"):  # shapes only: nothing allocated
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def _check_state(state: Mapping, shapes: dict[str, tuple[int, ...]], what: str, optional=()) -> None:
    missing = [k for k in shapes if k not in state and k not in optional]
    if missing:
        raise ExportError(
            f"{what}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" * (len(missing) > 1))
        )
    unexpected = [k for k in state if k not in shapes]
    if unexpected:
        raise ExportError(
            f"{what}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" * (len(unexpected) > 1))
        )
    for k, shape in shapes.items():
        if k in state and tuple(state[k].shape) != shape:
            raise ExportError(f"{what}: {k} has shape {tuple(state[k].shape)}, expected {shape}")


def to_llama(
    state: Mapping[str, torch.Tensor], cfg: ModelConfig, *, bos_id=None, eos_id=None, pad_id=None, dtype="float32"
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our state dict and ModelConfig -> (LlamaForCausalLM config.json dict, its state dict). Tensors keep their
    dtype (`dtype` only names it in the config); every tensor is a fresh contiguous copy (safetensors refuses
    shared storage). With tied embeddings, output.weight may be absent or must equal tok_embeddings.weight."""
    hf_config = llama_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, dtype=dtype)
    _check_state(state, expected_shapes(cfg), "state dict", optional=("output.weight",) if cfg.tie_embeddings else ())
    n_heads, kv, hd = _dims(cfg)
    h = ffn_dim(cfg)
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"].clone()}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        wq, wk, wv = state[p + "attention.wqkv.weight"].split([n_heads * hd, kv * hd, kv * hd])
        gate, up = state[p + "feed_forward.w13.weight"].split([h, h])
        out[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"].clone()
        out[q + "self_attn.q_proj.weight"] = wq.clone()
        out[q + "self_attn.k_proj.weight"] = wk.clone()
        out[q + "self_attn.v_proj.weight"] = wv.clone()
        out[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"].clone()
        out[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"].clone()
        out[q + "mlp.gate_proj.weight"] = gate.clone()
        out[q + "mlp.up_proj.weight"] = up.clone()
        out[q + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"].clone()
    out["model.norm.weight"] = state["norm.weight"].clone()
    if cfg.tie_embeddings:
        if "output.weight" in state and not torch.equal(state["output.weight"], state["tok_embeddings.weight"]):
            raise ExportError("state dict: output.weight differs from tok_embeddings.weight but model.tie_embeddings")
    else:
        out["lm_head.weight"] = state["output.weight"].clone()
    return hf_config, out


def _get(hf_config: dict, key: str, kind, default=dataclasses.MISSING):
    if key not in hf_config or hf_config[key] is None:
        if default is dataclasses.MISSING:
            raise ExportError(f"config.json: {key}: missing")
        return default
    value = hf_config[key]
    ok = isinstance(value, kind) and not isinstance(value, bool) if kind is not bool else isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ExportError(f"config.json: {key}: expected {kind.__name__}, got {value!r}")
    return value


def _rope_theta(hf_config: dict) -> float:
    """The rope base of a config, refusing any scaling (rope_scaling / rope_parameters of a type but default)."""
    thetas = []
    for key in ("rope_scaling", "rope_parameters"):
        params = hf_config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ExportError(f"config.json: {key}: expected a mapping, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ExportError(f"config.json: {key}: rope_type {kind!r} is not supported (only 'default' rotary)")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise ExportError(f"config.json: {key}: {', '.join(extra)} not supported (only default rotary)")
        if "rope_theta" in params:
            thetas.append((f"{key}.rope_theta", params["rope_theta"]))
    if hf_config.get("rope_theta") is not None:
        thetas.append(("rope_theta", hf_config["rope_theta"]))
    if not thetas:
        return 10000.0  # Llama's default
    for key, value in thetas:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ExportError(f"config.json: {key}: expected a positive number, got {value!r}")
    if len({float(v) for _, v in thetas}) > 1:
        raise ExportError(f"config.json: {thetas[0][0]} and {thetas[1][0]} disagree ({thetas[0][1]} vs {thetas[1][1]})")
    return float(thetas[0][1])


def config_from_llama(hf_config: dict) -> ModelConfig:
    """Our ModelConfig for a Llama config.json; refuses (naming the key) what our model cannot represent."""
    if not isinstance(hf_config, dict):
        raise ExportError(f"config.json: expected a mapping, got {type(hf_config).__name__}")
    if hf_config.get("model_type") != "llama":
        raise ExportError(f"config.json: model_type: {hf_config.get('model_type')!r} is not 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise ExportError(f"config.json: {key}: true is not supported (our model has no biases)")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ExportError(f"config.json: hidden_act: {hf_config['hidden_act']!r} is not supported (only 'silu')")
    for key in ("sliding_window", "use_sliding_window", "layer_types"):
        if hf_config.get(key) and not (key == "layer_types" and set(hf_config[key]) == {"full_attention"}):
            raise ExportError(f"config.json: {key}: {hf_config[key]!r} is not supported (full causal attention only)")
    d = _get(hf_config, "hidden_size", int)
    n_heads = _get(hf_config, "num_attention_heads", int)
    kv = _get(hf_config, "num_key_value_heads", int, n_heads)
    if n_heads <= 0 or d % n_heads:
        raise ExportError(f"config.json: num_attention_heads: {n_heads} does not divide hidden_size {d}")
    if kv <= 0 or n_heads % kv:
        raise ExportError(f"config.json: num_key_value_heads: {kv} does not divide num_attention_heads {n_heads}")
    head_dim = _get(hf_config, "head_dim", int, d // n_heads)
    if head_dim != d // n_heads:
        raise ExportError(
            f"config.json: head_dim: {head_dim} is not hidden_size / num_attention_heads = {d // n_heads}"
        )
    if head_dim % 2:
        raise ExportError(f"config.json: head_dim: {head_dim} must be even for rotary embeddings")
    vocab = _get(hf_config, "vocab_size", int)
    ffn = _get(hf_config, "intermediate_size", int)
    cfg = ModelConfig(
        vocab_size=vocab,
        pad_vocab_multiple=64 if vocab % 64 == 0 else 1,
        d_model=d,
        n_layers=_get(hf_config, "num_hidden_layers", int),
        n_heads=n_heads,
        n_kv_heads=kv,
        ffn_dim=ffn,
        seq_len=_get(hf_config, "max_position_embeddings", int),
        rope_theta=_rope_theta(hf_config),
        norm_eps=_get(hf_config, "rms_norm_eps", float, 1e-6),
        tie_embeddings=_get(hf_config, "tie_word_embeddings", bool, False),
        init_std=_get(hf_config, "initializer_range", float, 0.02),
    )
    return _recorded(hf_config, cfg)


def _recorded(hf_config: dict, cfg: ModelConfig) -> ModelConfig:
    """Our own export's ModelConfig, as recorded, when it describes the same model as the Llama keys: it keeps
    what Llama keys cannot say (the tokenizer's vocab size before padding, None for derived sizes, training-only
    options)."""
    record = hf_config.get(RECORD_KEY)
    if not isinstance(record, dict):
        return cfg
    try:
        recorded = ModelConfig(**record)
        same = llama_config(recorded) == llama_config(cfg) | {RECORD_KEY: dataclasses.asdict(recorded)}
    except (TypeError, ExportError):
        return cfg
    if not same:
        return cfg
    return recorded


def from_llama(hf_config: dict, hf_state: Mapping[str, torch.Tensor]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A LlamaForCausalLM config.json dict and state dict -> our ModelConfig and state dict (the exact inverse of
    `to_llama`; tensors keep their dtype). With tied embeddings output.weight is tok_embeddings.weight, as in our
    model's state_dict."""
    cfg = config_from_llama(hf_config)
    n_heads, kv, hd = _dims(cfg)
    d, h, v = cfg.d_model, ffn_dim(cfg), padded_vocab(cfg)
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(cfg.n_layers):
        q = f"model.layers.{i}."
        shapes |= {
            q + "input_layernorm.weight": (d,),
            q + "self_attn.q_proj.weight": (n_heads * hd, d),
            q + "self_attn.k_proj.weight": (kv * hd, d),
            q + "self_attn.v_proj.weight": (kv * hd, d),
            q + "self_attn.o_proj.weight": (d, n_heads * hd),
            q + "post_attention_layernorm.weight": (d,),
            q + "mlp.gate_proj.weight": (h, d),
            q + "mlp.up_proj.weight": (h, d),
            q + "mlp.down_proj.weight": (d, h),
        }
    # older transformers saved the rotary frequencies as buffers: derived values, not weights
    hf_state = {k: t for k, t in hf_state.items() if not k.endswith("rotary_emb.inv_freq")}
    _check_state(hf_state, shapes, "Llama state dict", optional=("lm_head.weight",) if cfg.tie_embeddings else ())
    embed = hf_state["model.embed_tokens.weight"]
    if cfg.tie_embeddings and "lm_head.weight" in hf_state and not torch.equal(hf_state["lm_head.weight"], embed):
        raise ExportError(
            "Llama state dict: lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings"
        )
    state = {"tok_embeddings.weight": embed.clone()}
    for i in range(cfg.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        state[p + "attention_norm.weight"] = hf_state[q + "input_layernorm.weight"].clone()
        state[p + "attention.wqkv.weight"] = torch.cat(
            [hf_state[q + f"self_attn.{x}_proj.weight"] for x in ("q", "k", "v")]
        )
        state[p + "attention.wo.weight"] = hf_state[q + "self_attn.o_proj.weight"].clone()
        state[p + "ffn_norm.weight"] = hf_state[q + "post_attention_layernorm.weight"].clone()
        state[p + "feed_forward.w13.weight"] = torch.cat(
            [hf_state[q + "mlp.gate_proj.weight"], hf_state[q + "mlp.up_proj.weight"]]
        )
        state[p + "feed_forward.w2.weight"] = hf_state[q + "mlp.down_proj.weight"].clone()
    state["norm.weight"] = hf_state["model.norm.weight"].clone()
    state["output.weight"] = (
        state["tok_embeddings.weight"] if cfg.tie_embeddings else hf_state["lm_head.weight"].clone()
    )
    return cfg, state


def config_overrides(cfg: ModelConfig) -> list[str]:
    """The `model.*=value` overrides of launch/pretrain.py that give `cfg` (training-only fields left out)."""
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in TRAINING_ONLY_FIELDS:
            continue
        value = getattr(cfg, f.name)
        out.append(
            f"model.{f.name}={'null' if value is None else str(value).lower() if isinstance(value, bool) else value}"
        )
    return out


# --- tokenizer ------------------------------------------------------------------------------------------------


def _load_spm(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except OSError as e:
        raise ExportError(f"{path}: cannot read the tokenizer ({e.strerror or e})") from None
    except Exception as e:  # protobuf's DecodeError
        raise ExportError(f"{path}: not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise ExportError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def _bpe_merges(pieces: list[tuple[str, float, int]]) -> list[list[str]]:
    """The merges of `tokenizers`' BPE that reproduce sentencepiece's BPE encoding.

    Sentencepiece merges, again and again, the adjacent pair whose concatenation is a piece with the highest score.
    So every split of a normal piece into two pieces of the vocab is a merge, ranked by the merged piece's score
    (higher first), then by the ids of the two parts."""
    ids = {p: i for i, (p, _, _) in enumerate(pieces)}
    normal = {p for p, _, kind in pieces if kind == 1}
    ranked = []
    for piece, score, kind in pieces:
        if kind != 1:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [[left, right] for _, _, _, left, right in ranked]


def tokenizer_json(sp_path: Path, *, add_bos: bool = False) -> dict:
    """A `tokenizers` JSON (tokenizer.json) that encodes and decodes as the sentencepiece model at `sp_path` (ids
    that are not valid UTF-8 byte sequences, e.g. a lone continuation byte, may decode to other replacement
    characters: tokenizers' ByteFallback decoder and sentencepiece differ there).

    Supported: BPE and unigram models with identity normalization (or none), whitespace escaped as U+2581,
    no whitespace collapsing, the dummy prefix on or off; byte fallback on or off. Control pieces and <unk> become
    special added tokens. Raises ExportError naming the setting otherwise."""
    proto = _load_spm(sp_path)
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise ExportError(f"{sp_path}: normalization {norm.name!r} is not supported (only identity)")
    if norm.remove_extra_whitespaces:
        raise ExportError(f"{sp_path}: remove_extra_whitespaces is not supported (train with it off)")
    if norm.HasField("escape_whitespaces") and not norm.escape_whitespaces:
        raise ExportError(f"{sp_path}: escape_whitespaces false is not supported")
    if trainer.treat_whitespace_as_suffix:
        raise ExportError(f"{sp_path}: treat_whitespace_as_suffix is not supported")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if kinds := sorted({kind for _, _, kind in pieces if kind in (4, 5)}):
        names = {4: "user-defined", 5: "unused"}
        raise ExportError(f"{sp_path}: {' and '.join(names[k] for k in kinds)} pieces are not supported")
    unk = [i for i, (_, _, kind) in enumerate(pieces) if kind == 2]
    if len(unk) != 1:
        raise ExportError(f"{sp_path}: expected one <unk> piece, found {len(unk)}")
    byte_fallback = trainer.byte_fallback
    model_type = pb_model_type(trainer.model_type)
    if model_type == "bpe":
        model = {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[unk[0]][0],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": byte_fallback,
            "ignore_merges": False,
            "vocab": {p: i for i, (p, _, _) in enumerate(pieces)},
            "merges": _bpe_merges(pieces),
        }
    elif model_type == "unigram":
        # One difference no score can remove: sentencepiece never matches a byte piece ("<0x41>") against text,
        # tokenizers' Unigram matches any piece, so a literal "<0x41>" in a text may become that byte's id.
        vocab = [[p, s] for p, s, _ in pieces]
        model = {"type": "Unigram", "unk_id": unk[0], "vocab": vocab, "byte_fallback": byte_fallback}
    else:
        raise ExportError(f"{sp_path}: model type {model_type!r} is not supported (only bpe and unigram)")
    add_prefix = not norm.HasField("add_dummy_prefix") or norm.add_dummy_prefix
    normalizers = [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}] if add_prefix else []
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE})
    decoders = [{"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}]
    decoders += [{"type": "ByteFallback"}] if byte_fallback else []
    decoders.append({"type": "Fuse"})
    if add_prefix:  # sentencepiece drops the dummy prefix's space at the start of a decoded text
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    specials = [
        {
            "id": i,
            "content": p,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (p, _, kind) in enumerate(pieces)
        if kind in (2, 3)
    ]
    post = None
    if add_bos:
        if trainer.bos_id < 0:
            raise ExportError(f"{sp_path}: add_bos asked, but the model has no bos piece")
        bos = pieces[trainer.bos_id][0]
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}},
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": specials,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }


def pb_model_type(code: int) -> str:
    return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(code, f"type {code}")


def special_ids(sp_path: Path) -> dict[str, int | None]:
    """bos/eos/pad/unk ids of a sentencepiece model (None where it has none)."""
    t = _load_spm(sp_path).trainer_spec
    return {
        k: (i if i >= 0 else None)
        for k, i in (("bos", t.bos_id), ("eos", t.eos_id), ("pad", t.pad_id), ("unk", t.unk_id))
    }


def tokenizer_files(sp_path: Path, *, seq_len: int, add_bos: bool = False) -> dict[str, bytes]:
    """The tokenizer files of a Hugging Face folder: tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and tokenizer.model (the sentencepiece file, for tools that want it)."""
    sp_path = Path(sp_path)
    tok = tokenizer_json(sp_path, add_bos=add_bos)
    pieces = tok["model"]["vocab"]
    piece = (lambda i: pieces[i][0]) if isinstance(pieces, list) else {i: p for p, i in pieces.items()}.get
    ids = special_ids(sp_path)
    tokens = {f"{k}_token": piece(i) for k, i in ids.items() if i is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
        "padding_side": "right",
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tok["added_tokens"]},
    }

    def dump(obj) -> bytes:
        return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()

    return {
        "tokenizer.json": dump(tok),
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(tokens),
        "tokenizer.model": sp_path.read_bytes(),
    }


# --- folders --------------------------------------------------------------------------------------------------


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most max_bytes (a bigger tensor gets a group of its own)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _prepare_output(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not overwrite:
        raise ExportError(f"{out_dir}: already exists (pass overwrite / --overwrite to replace it)")
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise ExportError(f"{out_dir}: exists and is not a folder; refusing to replace it")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ExportError(f"{out_dir}: a folder that is not a model export (no config.json); refusing to replace it")


def write_folder(
    state: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer_path: str | Path | None,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    add_bos: bool = False,
) -> Path:
    """Write a Hugging Face Llama folder: config.json, model.safetensors (or model-0000N-of-0000M.safetensors and
    model.safetensors.index.json past `max_shard_bytes`), generation_config.json and the tokenizer files
    (`tokenizer_files`; none when tokenizer_path is None). Everything is written in a temporary folder beside
    `out_dir` and renamed into place once complete; an existing out_dir is refused unless `overwrite` (then
    replaced only after the new folder is complete). `add_bos`: the training documents began with the bos id."""
    out_dir = Path(out_dir)
    if dtype not in DTYPES:
        raise ExportError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if max_shard_bytes <= 0:
        raise ExportError(f"max_shard_bytes: {max_shard_bytes} must be positive")
    _prepare_output(out_dir, overwrite)
    ids = special_ids(Path(tokenizer_path)) if tokenizer_path is not None else {}
    if tokenizer_path is not None and cfg.vocab_size is not None:
        n = len(_load_spm(Path(tokenizer_path)).pieces)
        if n != cfg.vocab_size:
            raise ExportError(
                f"{tokenizer_path}: {n} pieces, but the model was trained with model.vocab_size {cfg.vocab_size}: "
                "not its tokenizer"
            )
    hf_config, tensors = to_llama(
        state, cfg, bos_id=ids.get("bos"), eos_id=ids.get("eos"), pad_id=ids.get("pad"), dtype=dtype
    )
    tensors = {k: t.detach().to("cpu", DTYPES[dtype]).contiguous() for k, t in tensors.items()}
    files = {"config.json": hf_config}
    generation = {"do_sample": False, "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos")}
    generation["pad_token_id"] = ids.get("pad")
    if padded_vocab(cfg) > cfg.vocab_size:  # the embedding's padded rows are no tokens: never generate them
        generation["suppress_tokens"] = list(range(cfg.vocab_size, padded_vocab(cfg)))
    files["generation_config.json"] = generation
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, obj in files.items():
            _write_file(tmp / name, (json.dumps(obj, indent=2) + "\n").encode())
        if tokenizer_path is not None:
            for name, data in tokenizer_files(Path(tokenizer_path), seq_len=cfg.seq_len, add_bos=add_bos).items():
                _write_file(tmp / name, data)
        groups = _shards(tensors, max_shard_bytes)
        if len(groups) == 1:
            _save_safetensors(groups[0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, group in enumerate(groups, 1):
                name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                _save_safetensors(group, tmp / name)
                weight_map |= dict.fromkeys(group, name)
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_file(tmp / "model.safetensors.index.json", (json.dumps(index, indent=2) + "\n").encode())
        os.chmod(tmp, 0o777 & ~_umask())
        fsync_dir(tmp)
        _replace_dir(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the complete folder `tmp` to `out_dir`; an existing out_dir (overwrite) is moved aside first and
    removed after (a reader sees the old folder, briefly none, then the new one; never a partial one)."""
    old = None
    if out_dir.exists():
        _prepare_output(out_dir, overwrite)  # checked again: it may have appeared while we wrote
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if old is not None:  # put the old folder back
            os.replace(old / out_dir.name, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except OSError as e:
        raise ExportError(f"{path}: unreadable ({e.strerror or e})") from None
    except ValueError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"{path}: not a readable safetensors file ({e})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a folder's model.safetensors, or of the shards its model.safetensors.index.json lists."""
    path = Path(path)
    index_path = path / "model.safetensors.index.json"
    if (path / "model.safetensors").is_file():
        return _load_safetensors(path / "model.safetensors")
    if not index_path.is_file():
        bins = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        hint = f" (found {bins[0]}: save it with safe_serialization=True)" if bins else ""
        raise ExportError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ExportError(f"{index_path}: weight_map: expected a mapping of tensor names to file names")
    from pretrain.fileutil import stays_inside

    state: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        if not stays_inside(name):
            raise ExportError(f"{index_path}: weight_map names {name!r}, which is not a file inside {path}")
        shard = _load_safetensors(path / name)
        for key, tensor in shard.items():
            if weight_map.get(key) != name:
                raise ExportError(f"{path / name}: holds {key}, which {index_path.name} places elsewhere")
            state[key] = tensor
    if missing := sorted(set(weight_map) - set(state)):
        raise ExportError(f"{index_path}: {missing[0]} is not in {weight_map[missing[0]]}")
    return state


def read_folder(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """A Hugging Face Llama folder (ours or another's) -> (our ModelConfig, our state dict, the folder's
    tokenizer.model or None). Tensors keep the folder's dtype."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: not a folder")
    hf_config = _read_json(path / "config.json")
    try:
        cfg, state = from_llama(hf_config, read_weights(path))
    except ExportError as e:
        msg = str(e)  # from_llama names config.json or the state dict: say which folder
        if not msg.startswith(str(path)):
            msg = f"{path}/{msg}" if msg.startswith("config.json") else f"{path}: {msg}"
        raise ExportError(msg) from None
    sp = path / "tokenizer.model"
    return cfg, state, sp if sp.is_file() else None
