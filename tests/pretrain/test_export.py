"""pretrain/export.py and launch/export.py: a Hugging Face Llama folder that transformers loads offline and that
computes what our model computes (logits, greedy continuations, token ids), and the exact way back."""

import dataclasses
import importlib.util
import json
import os

import pytest
import sentencepiece as spm
import torch

from pretrain import checkpoint
from pretrain.config import ModelConfig, load_config, to_dict
from pretrain.export import ExportError, from_llama, read_folder, to_llama, write_folder
from pretrain.model import Transformer, padded_vocab

from ..helpers import REPO, tiny_engine

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may come from the network
try:
    import transformers
except ImportError as e:  # never skipped: `make setup` installs the [hf] extra
    raise ImportError(f"{e}: these tests need transformers, pip install -e '.[dev,hf]'") from None
transformers.logging.set_verbosity_error()

VOCAB = 2000  # the tokenizer_path fixture's pieces; the embedding has padded_vocab = 2048 rows
SMALL = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=96, rope_theta=500.0)
# Article 1 of the Universal Declaration of Human Rights, and a few more scripts
WORLD = [
    "Alle Menschen sind frei und gleich an Würde und Rechten geboren. Sie sind mit Vernunft und Gewissen begabt.",
    "Tous les êtres humains naissent libres et égaux en dignité et en droits.",
    "Todos los seres humanos nacen libres e iguales en dignidad y derechos.",
    "Все люди рождаются свободными и равными в своем достоинстве и правах.",
    "Όλοι οι άνθρωποι γεννιούνται ελεύθεροι και ίσοι στην αξιοπρέπεια και τα δικαιώματα.",
    "人人生而自由，在尊严和权利上一律平等。",
    "すべての人間は、生まれながらにして自由であり、かつ、尊厳と権利とについて平等である。",
    "모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다.",
    "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق.",
    "सभी मनुष्यों को गौरव और अधिकारों के मामले में जन्मजात स्वतन्त्रता और समानता प्राप्त है।",
    "  two leading spaces,\ttabs,\r\nCRLF and trailing  \n\n1234567 × 3.14 🙂 \x00\x7f",
    " one leading space",
    "",
    " ",
    "\n",
]


def small_model(*, tie: bool, seed: int = 0, **changes) -> tuple[ModelConfig, Transformer]:
    cfg = dataclasses.replace(SMALL, tie_embeddings=tie, **changes)
    model = Transformer(cfg)
    model.init_weights(seed)
    return cfg, model.eval()


def load_hf(folder):
    model = transformers.LlamaForCausalLM.from_pretrained(str(folder), local_files_only=True)
    return model.eval()


def load_hf_tokenizer(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def assert_close_rel(hf: torch.Tensor, ours: torch.Tensor, rel: float = 1e-4) -> None:
    err = (hf.float() - ours.float()).abs().max() / ours.float().abs().max()
    assert err <= rel, f"relative difference {err:.2e}"


@torch.no_grad()
def greedy_reference(model: Transformer, prompt: list[int], n: int, eos: int) -> list[int]:
    """Our greedy continuation with plain full forwards, over the tokenizer's ids only (never a padded row)."""
    ids = list(prompt)
    for _ in range(n):
        next_id = int(model(torch.tensor([ids]))[0, -1, :VOCAB].argmax())
        ids.append(next_id)
        if next_id == eos:
            break
    return ids[len(prompt) :]


# ----------------------------------------------------------------------------------------------- the mapping
@pytest.mark.parametrize("tie", [False, True])
def test_the_way_back_is_exact(tie):
    cfg, model = small_model(tie=tie, seed=1, ffn_dim=96)
    state = model.state_dict()
    hf_config, hf_state = to_llama(state, cfg, bos_id=1, eos_id=2, pad_id=3)
    assert ("lm_head.weight" in hf_state) is not tie and hf_config["vocab_size"] == padded_vocab(cfg) == 2048
    assert hf_config["intermediate_size"] == 96 and hf_config["head_dim"] == 16
    cfg2, state2 = from_llama(json.loads(json.dumps(hf_config)), hf_state)  # as if read from config.json
    assert cfg2 == cfg and state2.keys() == state.keys()
    assert all(torch.equal(state2[k], state[k]) for k in state)
    model.load_state_dict(state2)  # strict: the tied output.weight is there too

    bf16 = {k: t.to(torch.bfloat16) for k, t in state.items()}
    _, back = from_llama(*to_llama(bf16, cfg))
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], bf16[k]) for k in state)


def test_a_foreign_llama_config_maps_to_our_config():
    cfg, model = small_model(tie=False)
    hf_config, hf_state = to_llama(model.state_dict(), cfg)
    foreign = {k: v for k, v in hf_config.items() if k not in ("pretrain_model_config", "rope_parameters")}
    cfg2, state2 = from_llama(foreign, hf_state)
    assert padded_vocab(cfg2) == 2048 and cfg2.vocab_size == 2048 and cfg2.rope_theta == 500.0
    assert (cfg2.d_model, cfg2.n_layers, cfg2.n_heads, cfg2.n_kv_heads, cfg2.seq_len) == (64, 2, 4, 2, 96)
    assert all(torch.equal(state2[k], v) for k, v in model.state_dict().items())


def test_a_model_option_without_a_llama_equivalent_is_refused():
    @dataclasses.dataclass
    class Later(ModelConfig):
        qk_norm: bool = False  # an option added after the exporter was written

    cfg, model = small_model(tie=False)
    with pytest.raises(ExportError, match=r"model\.qk_norm: has no Hugging Face Llama equivalent"):
        to_llama(model.state_dict(), Later(**to_dict(cfg)))
    with pytest.raises(ExportError, match="model.vocab_size"):
        to_llama(model.state_dict(), dataclasses.replace(cfg, vocab_size=None))


@pytest.mark.parametrize(
    "change, key",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}, "rope_parameters"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10.0}}, "rope_parameters.rope_theta"),
        ({"head_dim": 32}, "head_dim"),
        ({"sliding_window": 64}, "sliding_window"),
        ({"model_type": "mistral"}, "model_type"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_what_our_model_cannot_represent_is_refused_by_key(change, key):
    cfg, model = small_model(tie=False)
    hf_config, hf_state = to_llama(model.state_dict(), cfg)
    with pytest.raises(ExportError, match=rf"config\.json: {key}"):
        from_llama(hf_config | change, hf_state)


def test_missing_unexpected_and_misshapen_tensors_are_refused_by_name():
    cfg, model = small_model(tie=False)
    hf_config, hf_state = to_llama(model.state_dict(), cfg)
    name = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(ExportError, match=f"missing tensor {name}"):
        from_llama(hf_config, {k: v for k, v in hf_state.items() if k != name})
    with pytest.raises(ExportError, match="unexpected tensor model.layers.1.self_attn.q_proj.bias"):
        from_llama(hf_config, hf_state | {"model.layers.1.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ExportError, match=rf"{name} has shape \(97, 64\), expected \(171, 64\)|{name} has shape"):
        from_llama(hf_config, hf_state | {name: torch.zeros(97, 64)})
    with pytest.raises(ExportError, match="lm_head.weight differs"):
        from_llama(hf_config | {"tie_word_embeddings": True}, hf_state)
    with pytest.raises(ExportError, match="missing tensor layers.0.attention.wqkv.weight"):
        to_llama({k: v for k, v in model.state_dict().items() if "wqkv" not in k}, cfg)


# ----------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("tie", [False, True])
def test_transformers_computes_what_we_compute(tmp_path, tokenizer, tokenizer_path, speeches, tie):
    cfg, model = small_model(tie=tie, seed=2)
    state = model.state_dict()
    if not tie:  # padded rows that would win every argmax: generation_config.json must keep generate off them
        with torch.no_grad():
            model.output.weight[VOCAB:] = 50 * model.output.weight[: padded_vocab(cfg) - VOCAB]
        state = model.state_dict()
    folder = write_folder(state, cfg, tokenizer_path, tmp_path / "hf")
    hf, hf_tok = load_hf(folder), load_hf_tokenizer(folder)
    assert hf.config.vocab_size == 2048 and hf.dtype == torch.float32

    ids = torch.randint(0, VOCAB, (3, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_rel(hf(ids).logits, model(ids))
    text = speeches[-1].read_text()
    for prompt in (text[:300], text[1000:1200], WORLD[0]):
        prompt_ids = hf_tok(prompt)["input_ids"]
        assert prompt_ids == tokenizer.encode(prompt)
        x = torch.tensor([prompt_ids[:40]])
        with torch.no_grad():
            ours = model(x)
            assert_close_rel(hf(x).logits, ours)
        if not tie:
            assert int(ours[0, -1].argmax()) >= VOCAB  # the padded rows do win a plain argmax
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
        new = out[0, x.shape[1] :].tolist()
        assert max(new) < VOCAB and new == greedy_reference(model, x[0].tolist(), 12, tokenizer.eod_id)


def test_a_bfloat16_export_loads_in_bfloat16(tmp_path, tokenizer_path):
    cfg, model = small_model(tie=False, seed=3)
    folder = write_folder(model.state_dict(), cfg, tokenizer_path, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, state, sp = read_folder(folder)
    assert cfg2 == cfg and sp == folder / "tokenizer.model"
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    hf = load_hf(folder)
    ids = torch.randint(0, VOCAB, (1, 32))
    with torch.no_grad():
        assert_close_rel(hf.float()(ids).logits, model.to(torch.bfloat16).float()(ids), rel=1e-4)


def test_a_sharded_export_loads_and_reads_back(tmp_path, tokenizer_path):
    cfg, model = small_model(tie=True, seed=4)
    folder = write_folder(model.state_dict(), cfg, tokenizer_path, tmp_path / "hf", max_shard_bytes=100_000)
    shards = sorted(folder.glob("model-*.safetensors"))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {p.name for p in shards} and shards[0].name.endswith(
        f"of-{len(shards):05d}.safetensors"
    )
    cfg2, state, _ = read_folder(folder)
    assert cfg2 == cfg and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert_close_rel(load_hf(folder)(ids).logits, model(ids))


# ----------------------------------------------------------------------------------------------- the tokenizer
@pytest.fixture(scope="module")
def unigram_path(tmp_path_factory, speeches):
    from data_prep import train_tokenizer

    out = tmp_path_factory.mktemp("unigram") / "sp"
    args = [str(p) for p in speeches[:30]] + ["--output", str(out), "--vocab-size", "1000", "--model-type", "unigram"]
    assert train_tokenizer.main(args + ["--quiet"]) == 0
    return out.with_suffix(".model")


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_autotokenizer_gives_our_ids_and_text_back(tmp_path, tokenizer_path, unigram_path, speeches, kind):
    from pretrain.tokenizer import Tokenizer

    sp_path = tokenizer_path if kind == "bpe" else unigram_path
    ours = Tokenizer(sp_path)
    cfg, model = small_model(tie=True, vocab_size=spm.SentencePieceProcessor(model_file=str(sp_path)).vocab_size())
    folder = write_folder(model.state_dict(), cfg, sp_path, tmp_path / "hf")
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_config["add_bos_token"] is False
    hf = load_hf_tokenizer(folder)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)
    texts = [p.read_text() for p in speeches[-4:]] + WORLD  # English the tokenizer was not trained on
    texts += [line for p in speeches[-2:] for line in p.read_text().splitlines()[:20]]
    for text in texts:
        ids = ours.encode(text)
        assert hf(text)["input_ids"] == ids, text[:80]
        assert hf.decode(ids) == ours.decode(ids) == text
    assert hf(["a", " b"])["input_ids"] == ours.encode(["a", " b"])
    # the one standard difference: a literal "</s>" is the eos token for transformers, text for sentencepiece
    assert hf("end</s>")["input_ids"][-1] == ours.eod_id and ours.encode("end</s>")[-1] != ours.eod_id


def test_unsupported_tokenizers_are_refused(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.WORD
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.remove_extra_whitespaces = False
    for piece, kind in (("<unk>", 2), ("<s>", 3), ("▁a", 1)):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    (tmp_path / "word.model").write_bytes(proto.SerializeToString())
    cfg, model = small_model(tie=True, vocab_size=3)
    with pytest.raises(ExportError, match=r"word.model: model type 'word' is not supported"):
        write_folder(model.state_dict(), cfg, tmp_path / "word.model", tmp_path / "hf")
    proto.normalizer_spec.name = "nmt_nfkc"
    (tmp_path / "nfkc.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ExportError, match=r"nfkc.model: normalization 'nmt_nfkc' is not supported"):
        write_folder(model.state_dict(), cfg, tmp_path / "nfkc.model", tmp_path / "hf")
    (tmp_path / "junk.model").write_bytes(b"\xff" * 10)
    with pytest.raises(ExportError, match="junk.model: not a sentencepiece model"):
        write_folder(model.state_dict(), cfg, tmp_path / "junk.model", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.model", "nfkc.model", "word.model"]


# ----------------------------------------------------------------------------------------------- folders
def test_an_existing_output_is_kept_unless_overwrite_and_never_half_written(tmp_path, tokenizer_path, monkeypatch):
    from pretrain import export

    cfg, a = small_model(tie=False, seed=5)
    _, b = small_model(tie=False, seed=6)
    out = tmp_path / "hf"
    write_folder(a.state_dict(), cfg, tokenizer_path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ExportError, match=f"{out}: already exists"):
        write_folder(b.state_dict(), cfg, tokenizer_path, out)

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_save_safetensors", fail)
    with pytest.raises(OSError, match="No space left"):
        write_folder(b.state_dict(), cfg, tokenizer_path, out, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        write_folder(b.state_dict(), cfg, tokenizer_path, tmp_path / "new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder, no half-written "new"

    write_folder(b.state_dict(), cfg, tokenizer_path, out, overwrite=True)
    assert all(torch.equal(read_folder(out)[1][k], v) for k, v in b.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a model export"):
        write_folder(b.state_dict(), cfg, tokenizer_path, tmp_path / "notes", overwrite=True)


def test_read_folder_names_the_bad_file(tmp_path, tokenizer_path):
    cfg, model = small_model(tie=True)
    out = write_folder(model.state_dict(), cfg, tokenizer_path, tmp_path / "hf")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ExportError, match=f"{weights}: not a readable safetensors file"):
        read_folder(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match=f"{out / 'config.json'}: not valid JSON"):
        read_folder(out)
    (out / "config.json").unlink()
    with pytest.raises(ExportError, match=f"{out / 'config.json'}: missing"):
        read_folder(out)


# ----------------------------------------------------------------------------------------------- launch/export.py
def export_cli():
    spec = importlib.util.spec_from_file_location("launch_export", REPO / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_to_hf_and_from_hf_from_a_run(tmp_path, world, ds_json, tokenizer_path, capsys):
    model_cfg = dataclasses.replace(SMALL, seq_len=16, n_kv_heads=None, tie_embeddings=False)
    engine = tiny_engine(ds_json(0), seed=7, **to_dict(model_cfg))
    config = {"model": to_dict(model_cfg), "data": {"tokenizer": str(tokenizer_path), "datasets": []}}
    meta = checkpoint.CheckpointMeta.of_run(
        global_batch=4, world_size=1, zero_stage=0, config=config, data_fingerprint={}
    )
    tag = checkpoint.save(engine, world, tmp_path / "run" / "checkpoints", meta.at(3))
    main = export_cli()
    out = tmp_path / "hf"
    assert main(["to-hf", str(tmp_path / "run"), "--output", str(out), "--max-shard-size", "200KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert main(["to-hf", str(tmp_path / "run"), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["to-hf", str(tmp_path / "run"), "--output", str(out), "--tag", tag, "--overwrite"]) == 0
    hf = load_hf(out)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert_close_rel(hf(ids).logits, engine.module.float()(ids))

    capsys.readouterr()
    assert main(["from-hf", str(out), "--output", str(tmp_path / "model.pt")]) == 0
    printed = capsys.readouterr().out
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    consolidated = checkpoint.consolidate(tmp_path / "run" / "checkpoints", tag)
    assert state.keys() == consolidated.keys() and all(torch.equal(state[k], consolidated[k]) for k in state)
    overrides = next(line for line in printed.splitlines() if line.startswith("model."))
    run = load_config(None, overrides.split() + ["data.datasets=[d]", "data.tokenizer=t", "train.global_batch_seqs=4"])
    assert run.model == dataclasses.replace(model_cfg, init_std=run.model.init_std)
    assert main(["from-hf", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.pt")]) == 2
    assert main(["to-hf", str(tmp_path / "run"), "--output", str(tmp_path / "y"), "--tokenizer", "no.model"]) == 2


def test_a_tokenizer_of_another_vocab_size_is_refused(tmp_path, unigram_path):
    cfg, model = small_model(tie=True)  # vocab 2000; the unigram tokenizer has 1000 pieces
    with pytest.raises(ExportError, match="1000 pieces, but the model was trained with model.vocab_size 2000"):
        write_folder(model.state_dict(), cfg, unigram_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
