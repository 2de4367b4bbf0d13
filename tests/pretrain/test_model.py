import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.model import Transformer, padded_vocab


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32)
    return ModelConfig(**{**base, **kw})


def build(seed=0, **kw) -> Transformer:
    m = Transformer(tiny(**kw))
    m.init_weights(seed)
    return m


def test_parameter_count_and_flops_by_hand():
    m = build()
    # vocab 1000 -> 1024 rows; head_dim 16; q 4 heads + k, v 2 heads each = 128 columns; ffn 8/3*64=170 -> 256
    embed = 1024 * 64
    per_layer = 64 * 128 + 64 * 64 + 64 * 2 * 256 + 256 * 64  # wqkv, wo, w13 (gate+up), w2
    norms_per_layer = 2 * 64
    head = 64 * 1024
    assert m.num_params() == embed + 2 * (per_layer + norms_per_layer) + 64 + head == 254_272
    assert m.num_params(matmul_only=True) == 2 * per_layer + head == 188_416
    assert m.flops_per_token(32) == 6 * 188_416 + 12 * 2 * 64 * 32 == 1_179_648
    tied = build(tie_embeddings=True)
    assert tied.num_params() == 254_272 - head
    assert tied.num_params(matmul_only=True) == 188_416  # the tied head still does its matmul


def test_vocab_padding():
    assert padded_vocab(tiny(vocab_size=1000)) == 1024
    assert padded_vocab(tiny(vocab_size=1024)) == 1024
    assert padded_vocab(tiny(vocab_size=32000, pad_vocab_multiple=128)) == 32000
    assert padded_vocab(tiny(vocab_size=32001, pad_vocab_multiple=128)) == 32128


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_causality(n_kv_heads):
    m = build(n_kv_heads=n_kv_heads).eval()
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = m(x)
        for t in (0, 10, 22):
            y = x.clone()
            y[:, t + 1] = (y[:, t + 1] + 1) % 1000
            out = m(y)
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=0)
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_attention_equals_mha_with_shared_heads(n_kv_heads):
    """GQA == multi-head attention whose k/v heads are copies of the group's shared head."""
    gqa = build(n_kv_heads=n_kv_heads).eval()
    mha = build(n_kv_heads=4).eval()
    sd = gqa.state_dict()
    for i in range(2):
        w = sd[f"layers.{i}.attention.wqkv.weight"]  # (q 64 | k n_kv*16 | v n_kv*16, 64)
        q, k, v = w.split([64, n_kv_heads * 16, n_kv_heads * 16])
        expand = lambda t: t.view(n_kv_heads, 16, 64).repeat_interleave(4 // n_kv_heads, 0).reshape(64, 64)  # noqa: E731
        sd[f"layers.{i}.attention.wqkv.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(sd)
    x = torch.randint(0, 1000, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_init_is_seeded():
    a, b, c = build(seed=1), build(seed=1), build(seed=2)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if "norm" not in name:
            assert not torch.equal(p, r), name
    std = a.layers[0].attention.wo.weight.std().item()
    assert abs(std - 0.02 / (2 * 2) ** 0.5) < 0.002  # residual projections scaled by 1/sqrt(2 n_layers)


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = build()
    x = torch.randint(0, 1000, (2, 17))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(150):
        loss = F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def assert_checkpointing_gives_the_same_gradients(x: torch.Tensor, **kw) -> None:
    grads = []
    for ckpt in (False, True):
        m = build(activation_checkpointing=ckpt, **kw)
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_activation_checkpointing_gives_the_same_gradients():
    assert_checkpointing_gives_the_same_gradients(torch.randint(0, 1000, (2, 16)))


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than model.seq_len 32"):
        build()(torch.zeros(1, 33, dtype=torch.long))


# ------------------------------------------------------------------------------------------- document masking
EOD = 2


def packed(docs: list[list[int]]) -> torch.Tensor:
    """Documents, each ending with EOD, packed into one window (1, seq)."""
    return torch.tensor([[t for d in docs for t in d + [EOD]]])


def random_docs(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]


def test_document_mask_and_positions_by_hand():
    from pretrain.model import document_mask

    tokens = torch.tensor([[5, 6, EOD, 7, EOD, EOD, 8], [EOD, 5, 6, 7, 8, 9, 4]])
    mask, positions = document_mask(tokens, EOD)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    docs = [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    for row in range(2):
        expect = [[docs[row][k] == docs[row][q] and k <= q for k in range(7)] for q in range(7)]
        assert mask[row, 0].tolist() == expect


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("n_kv_heads", [1, 4])
def test_a_document_in_a_packed_window_has_the_logits_it_has_alone(positions, n_kv_heads):
    m = build(n_kv_heads=n_kv_heads, document_masking=True, document_positions=positions, eod_id=EOD).eval()
    docs = random_docs([5, 9, 1, 7, 4])  # 5 documents of 6 + 10 + 2 + 8 + 5 = 31 tokens with their EODs
    with torch.no_grad():
        window = m(packed(docs))
        start = 0
        for d in docs:
            alone = m(packed([d]))
            n = len(d) + 1
            # restarted positions are the document's own: exact up to the order of additions (masked keys add 0)
            torch.testing.assert_close(window[:, start : start + n], alone, rtol=0, atol=1e-5 if positions else 3e-5)
            start += n
        plain = build(n_kv_heads=n_kv_heads).eval()(packed(docs))  # without masking, later documents see earlier ones
        assert not torch.allclose(plain[:, 6:], window[:, 6:], atol=1e-3)
        torch.testing.assert_close(plain[:, :6], window[:, :6], rtol=0, atol=1e-5)  # the first one sees nothing else


def test_document_masking_with_activation_checkpointing_gives_the_same_gradients():
    x = packed(random_docs([6, 3, 12, 8]))
    assert_checkpointing_gives_the_same_gradients(x, document_masking=True, document_positions=True, eod_id=EOD)


def test_document_masking_needs_the_eod_id():
    with pytest.raises(ValueError, match="model.document_masking needs model.eod_id"):
        build(document_masking=True)(torch.zeros(1, 4, dtype=torch.long))
