"""Loading a trained model: from a run's checkpoint or an exported folder, the weights it holds, its tokenizer, how
its documents began; the weights a run starts from (train.init_from). Refusals name the file or key."""

import json

import pytest
import torch

from pretrain.config import ConfigError, ModelConfig
from pretrain.inference import LoadError, initial_weights, load_model
from pretrain.model import Transformer

from ..helpers import save_tiny_run, tokenize


def test_a_checkpoint_loads_with_its_weights_and_tokenizer(tiny_run, tokenizer_path):
    run, engine = tiny_run
    loaded = load_model(run, device="cpu")
    assert loaded.source == str(run / "checkpoints" / "step_00000002") and loaded.device == torch.device("cpu")
    assert loaded.tokenizer.path == tokenizer_path and not loaded.add_bos and not loaded.model.training
    for name, value in engine.module.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert load_model(run / "checkpoints", tag="step_00000002", device="cpu").source == loaded.source


def test_what_cannot_be_loaded_is_refused_by_name(tmp_path, tiny_run, speeches):
    from data_prep import train_tokenizer

    run, _ = tiny_run
    with pytest.raises(LoadError, match="step_00000009"):
        load_model(run, tag="step_00000009", device="cpu")
    with pytest.raises(LoadError, match=f"{tmp_path}: neither a run directory"):
        load_model(tmp_path, device="cpu")
    small = tmp_path / "small"
    assert train_tokenizer.main([str(speeches[0]), "--output", str(small), "--vocab-size", "500", "--quiet"]) == 0
    with pytest.raises(LoadError, match="500 pieces, but the model .* vocab of 2000: not its tokenizer"):
        load_model(run, tokenizer=small.with_suffix(".model"), device="cpu")
    with pytest.raises(LoadError, match="dtype: 'int8'"):
        load_model(run, dtype="int8", device="cpu")


def test_a_run_whose_documents_began_with_bos_is_known(tmp_path, world, ds_json, speeches, tokenizer_path):
    """data_prep tokenize --add-bos: the loader says so, and launch/generate.py begins each prompt with bos."""
    from launch import generate as cli
    from pretrain.tokenizer import Tokenizer

    data = tmp_path / "bos_data"
    assert tokenize(speeches[:3], data, tokenizer_path, "--add-bos") == 0
    run, _ = save_tiny_run(tmp_path / "run", ds_json(0), tokenizer_path, {"datasets": [{"path": str(data)}]})
    assert load_model(run, device="cpu").add_bos
    out = tmp_path / "out.jsonl"
    argv = [str(run), "--prompt", "The Union", "--max-new-tokens", "3", "--output", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["prompt_tokens"] == len(Tokenizer(tokenizer_path).encode("The Union")) + 1


def test_starting_weights_are_checked_against_the_run_model(tmp_path):
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, seq_len=16)
    model = Transformer(cfg)
    model.init_weights(1)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    got = initial_weights(path, cfg)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match=r"train.init_from: .*layers.0.attention.wqkv.weight has shape"):
        initial_weights(path, ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, seq_len=16))
    with pytest.raises(ConfigError, match="missing layers.2"):
        initial_weights(path, ModelConfig(vocab_size=100, d_model=32, n_layers=3, n_heads=2, seq_len=16))
    with pytest.raises(ConfigError, match=f"train.init_from: {tmp_path / 'none.pt'} not found"):
        initial_weights(tmp_path / "none.pt", cfg)
    with pytest.raises(ConfigError, match="without config.json"):
        initial_weights(tmp_path, cfg)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="not a state dict of tensors"):
        initial_weights(tmp_path / "junk.pt", cfg)
