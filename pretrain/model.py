"""A decoder-only transformer in the Llama family: RMSNorm, rotary position embeddings, grouped-query attention
(SDPA, causal), SwiGLU feed-forward, pre-norm residual blocks.

    model = Transformer(cfg.model)          # cfg.model.vocab_size set (the tokenizer's)
    logits = model(tokens)                  # (batch, seq) int64 -> (batch, seq, padded_vocab)

The model knows nothing about losses, data or DeepSpeed. Weights are initialised from a seeded generator by
`init_weights(seed)`, so the same seed gives the same model on any device and any number of ranks (with ZeRO-3
the caller passes a `gather` that makes each partitioned weight whole while it is written).
Rotary embeddings rotate the two halves of each head (the `rotate_half` convention), as Hugging Face's Llama does,
so weights export without permutation. q/k/v and the SwiGLU gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import ModelConfig


class WeightInit:
    """Fills weights, in the order the modules ask, from one CPU generator: the same seed gives the same weights
    on any device. `gather(params)` makes partitioned (ZeRO-3) weights whole while they are written."""

    def __init__(self, seed: int, gather=None):
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.gather = gather or (lambda params: contextlib.nullcontext())

    def normal(self, w: torch.Tensor, std: float) -> None:
        with self.gather([w]):
            w.copy_(torch.empty(w.shape, dtype=torch.float32).normal_(0.0, std, generator=self.gen))

    def ones(self, w: torch.Tensor) -> None:
        with self.gather([w]):
            w.fill_(1.0)


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it away (ds_numel)."""
    return getattr(p, "ds_numel", p.numel())


def padded_vocab(cfg: ModelConfig) -> int:
    m = cfg.pad_vocab_multiple
    return (cfg.vocab_size + m - 1) // m * m


def ffn_dim(cfg: ModelConfig) -> int:
    if cfg.ffn_dim is not None:
        return cfg.ffn_dim
    hidden = int(8 * cfg.d_model / 3)
    return (hidden + 255) // 256 * 256


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def init_weights(self, init: WeightInit) -> None:
        init.ones(self.weight)


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (seq, head_dim), each frequency repeated for both halves."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)  # (seq, head_dim / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (seq, head_dim)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wqkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, n_heads, seq, head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (batch, n_kv_heads, seq, head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # each kv head serves n_heads / n_kv_heads query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (batch, n_heads, seq, head_dim)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (batch, n_heads, seq, head_dim)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))  # (batch, seq, d_model)

    def init_weights(self, init: WeightInit, std: float, out_std: float) -> None:
        init.normal(self.wqkv.weight, std)
        init.normal(self.wo.weight, out_std)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x w1) * (x w3)), with w1 and w3 fused into w13."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden = ffn_dim(cfg)
        self.w13 = nn.Linear(cfg.d_model, 2 * self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)  # (batch, seq, hidden) each
        return self.w2(F.silu(gate) * up)

    def init_weights(self, init: WeightInit, std: float, out_std: float) -> None:
        init.normal(self.w13.weight, std)
        init.normal(self.w2.weight, out_std)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, init: WeightInit, std: float, out_std: float) -> None:
        self.attention_norm.init_weights(init)
        self.attention.init_weights(init, std, out_std)
        self.ffn_norm.init_weights(init)
        self.feed_forward.init_weights(init, std, out_std)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (the tokenizer's vocab size) before building the model")
        self.cfg = cfg
        self.vocab_size = padded_vocab(cfg)
        self.tok_embeddings = nn.Embedding(self.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, self.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rotary_tables(cfg.d_model // cfg.n_heads, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len {self.cfg.seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.tok_embeddings(tokens)  # (batch, seq, d_model)
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.output(self.norm(x))  # (batch, seq, padded_vocab)

    @torch.no_grad()
    def init_weights(self, seed: int, *, gather=None) -> None:
        """Initialise every weight from one generator seeded with `seed`; `gather` as in WeightInit."""
        init = WeightInit(seed, gather)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual projections: keep the stream's variance flat
        init.normal(self.tok_embeddings.weight, std)
        for layer in self.layers:
            layer.init_weights(init, std, out_std)
        self.norm.init_weights(init)
        if not self.cfg.tie_embeddings:
            init.normal(self.output.weight, std)

    def num_params(self, *, matmul_only: bool = False) -> int:
        """All parameters (a tied embedding counted once), or those that do matmuls: everything but the input
        embedding lookup and the norms, with the output head counted even when tied."""
        if not matmul_only:
            return sum(numel(p) for p in self.parameters())
        d = self.cfg.d_model
        per_layer = sum(numel(p) for name, p in self.layers[0].named_parameters() if "norm" not in name)
        return self.cfg.n_layers * per_layer + d * self.vocab_size

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N + 12 n_layers d_model seq_len (PaLM, appendix B), N = matmul parameters.

        6N: forward 2N, backward 4N. The second term is attention's QK^T and AV over the full (not causally
        halved) sequence, forward and backward. Activation recomputation is not counted (model FLOPs, not
        hardware FLOPs).
        """
        t = seq_len or self.cfg.seq_len
        return 6 * self.num_params(matmul_only=True) + 12 * self.cfg.n_layers * self.cfg.d_model * t
