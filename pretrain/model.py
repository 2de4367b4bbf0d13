"""A decoder-only transformer in the Llama family: RMSNorm, rotary position embeddings, grouped-query attention
(SDPA, causal), SwiGLU feed-forward, pre-norm residual blocks. With `model.document_masking`, attention in a packed
window stays inside each document (see `document_mask`).

    model = Transformer(cfg.model)          # cfg.model.vocab_size set (the tokenizer's)
    logits = model(tokens)                  # (batch, seq) int64 -> (batch, seq, padded_vocab)
    cache = KVCache.for_model(model, batch=4, capacity=512)     # incremental decoding (pretrain/generate.py)
    logits = model(prompt_tokens, cache=cache, valid=prompt_mask)   # keys/values kept; then one token at a time

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
    """x: (batch, heads, seq, head_dim); cos, sin: (seq, head_dim), or (batch, 1, seq, head_dim) per row."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def document_mask(tokens: torch.Tensor, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention mask that keeps each document of packed windows to itself, and each token's position in its
    document: (batch, 1, seq, seq) bool (True: may attend) and (batch, seq) int64.

    A document ends with its EOD token (which belongs to it); the next token begins another. A token attends to the
    tokens of its own document up to itself, so the logits of a document are those of the document alone (with
    positions restarted, exactly; without, up to rounding: rotary attention depends on relative positions only).
    """
    b, t = tokens.shape
    ends = tokens == eod_id
    doc = ends.cumsum(dim=1) - ends.long()  # the number of documents ended before each token
    idx = torch.arange(t, device=tokens.device)
    causal = idx[None, :] <= idx[:, None]  # (query, key)
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # (batch, query, key)
    starts = torch.ones_like(ends)
    starts[:, 1:] = ends[:, :-1]  # a document starts at 0 and after every EOD
    first = torch.where(starts, idx, 0).cummax(dim=1).values  # where each token's document starts
    return mask[:, None], idx - first


class KVCache:
    """Keys and values of every layer for incremental decoding, in slots (batch, n_kv_heads, capacity, head_dim).

    Each row writes its next tokens at its own slot (`write`), so prompts of different lengths batch with either
    padding: left-padded rows all write at the same slot, right-padded rows each after their own last token.
    `valid` marks slots holding real tokens (not padding); a token's position is the number of valid slots
    before it, and it attends to the valid slots up to its own. `reorder` follows beam search's choices.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, *, device, dtype):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.device = torch.device(device)
        # the bookkeeping is mirrored on the host, so that a step needs no device-to-host sync
        self.write = torch.zeros(batch, dtype=torch.long)  # each row's next free slot
        self.count = torch.zeros(batch, dtype=torch.long)  # each row's real tokens so far
        self.capacity = capacity
        self.used = 0  # slots [0, used) may hold keys of some row
        self.max_position = -1  # the highest position of a real token so far
        self.all_valid = True  # no padding anywhere so far: attention needs no mask
        self.slots = self.mask = None  # of the forward in progress (begin)

    @classmethod
    def for_model(cls, model: Transformer, *, batch: int, capacity: int) -> KVCache:
        cfg, p = model.cfg, model.tok_embeddings.weight
        n_kv = cfg.n_kv_heads or cfg.n_heads
        return cls(cfg.n_layers, batch, n_kv, capacity, cfg.d_model // cfg.n_heads, device=p.device, dtype=p.dtype)

    def begin(self, t: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Claim slots for the next `t` tokens of every row (`valid`: (batch, t), False for padding; best on the
        host); returns their positions (batch, t) and prepares the attention mask the layers use."""
        b = self.write.shape[0]
        new_valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid.cpu().bool()
        offsets = torch.arange(t)
        slots = self.write[:, None] + offsets  # (batch, t)
        top = int(slots.max())
        if top >= self.capacity:
            raise ValueError(
                f"KV cache full: a row needs slot {top} of {self.capacity} (size it for the tokens to come)"
            )
        self.used = max(self.used, top + 1)
        # the next free slot follows each row's last real token (right padding is overwritten by what comes next)
        self.write = self.write + torch.where(new_valid, offsets + 1, 0).amax(dim=1)
        self.count = self.count + new_valid.sum(dim=1)
        self.max_position = max(self.max_position, int(self.count.max()) - 1)
        first = self.all_valid and t == self.used  # the first tokens of every row, no padding: plain causal
        self.all_valid = self.all_valid and bool(new_valid.all())
        self.slots = slots.to(self.device)
        new_valid = new_valid.to(self.device)
        rows = torch.arange(b, device=self.device)[:, None]
        self.valid[rows, self.slots] = new_valid
        positions = (self.valid[:, : self.used].cumsum(-1) - 1).gather(1, self.slots)
        positions = torch.where(new_valid, positions, 0)
        if self.all_valid and (t == 1 or first):
            self.mask = None  # no padding, one new token or the first ones: no mask (causal for the first ones)
        else:
            keys = torch.arange(self.used, device=self.device)
            sees = (keys[None, None, :] <= self.slots[:, :, None]) & self.valid[:, None, : self.used]
            sees |= keys[None, None, :] == self.slots[:, :, None]  # padding attends to itself: no empty rows (NaN)
            self.mask = sees[:, None]  # (batch, 1, t, used)
        return positions

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys and values (batch, n_kv_heads, t, head_dim) of `layer` into their slots;
        returns all keys and values in use (batch, n_kv_heads, used, head_dim)."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[layer][rows, :, self.slots] = k.transpose(1, 2)
        self.v[layer][rows, :, self.slots] = v.transpose(1, 2)
        return self.k[layer][:, :, : self.used], self.v[layer][:, :, : self.used]

    def reorder(self, index: list[int] | torch.Tensor) -> None:
        """Rows become the rows `index` names (beam search keeps the chosen beams' histories); in place, over the
        slots in use."""
        host = torch.as_tensor(index, dtype=torch.long).cpu()
        if torch.equal(host, torch.arange(len(host))):
            return
        idx = host.to(self.device)
        for t in self.k + self.v:
            t[:, :, : self.used] = t[:, :, : self.used].index_select(0, idx)
        self.valid[:, : self.used] = self.valid[:, : self.used].index_select(0, idx)
        self.write, self.count = self.write[host], self.count[host]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wqkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` (batch, 1, seq, seq) bool: which keys each query sees (document masking); None: causal."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, n_heads, seq, head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (batch, n_kv_heads, seq, head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.store(layer, k, v)  # (batch, n_kv_heads, used, head_dim)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=cache.mask, is_causal=cache.mask is None and t > 1,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # fmt: skip
            return self.wo(y.transpose(1, 2).reshape(b, t, -1))
        if self.n_kv_heads != self.n_heads:  # each kv head serves n_heads / n_kv_heads query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (batch, n_heads, seq, head_dim)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (b, n_heads, seq, hd)
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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
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

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        cache: KVCache | None = None,
        valid: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (batch, seq, padded_vocab) of a batch of token ids (batch, seq).

        With a `cache`, the tokens continue what it holds (their keys and values are added to it); `valid`
        (batch, seq) marks padding (False) in them. `select` (batch,): only the logits at that index of each row,
        (batch, 1, padded_vocab) (the next token's, when generating).
        """
        t, mask = tokens.shape[1], None
        if cache is None:
            if t > self.cfg.seq_len:
                raise ValueError(f"sequence of {t} tokens is longer than model.seq_len {self.cfg.seq_len}")
            cos, sin = self.rope_cos[:t], self.rope_sin[:t]
            if self.cfg.document_masking:
                if self.cfg.eod_id is None:
                    raise ValueError("model.document_masking needs model.eod_id (set from the tokenizer)")
                mask, positions = document_mask(tokens, self.cfg.eod_id)
                if self.cfg.document_positions:
                    cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        else:
            positions = cache.begin(t, valid)
            if cache.max_position >= self.cfg.seq_len:
                raise ValueError(f"position {cache.max_position} is beyond model.seq_len {self.cfg.seq_len}")
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (batch, 1, t, head_dim)
        x = self.tok_embeddings(tokens)  # (batch, seq, d_model)
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, cache, i)
            elif self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, None, i, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask=mask)
        if select is not None:
            x = x[torch.arange(x.shape[0], device=x.device), select][:, None]  # (batch, 1, d_model)
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
