import pytest

from pretrain.config import ConfigError, DatasetSpec, load_config

from ..helpers import REPO

BASE = ["data.tokenizer=t.model", "data.datasets=[d]", "train.global_batch_seqs=8"]


def test_demo_config_loads_and_overrides_win():
    cfg = load_config(
        REPO / "launch/configs/demo.yaml", ["train.max_steps=7", "optim.lr=0.01", "model.n_kv_heads=null"]
    )
    assert cfg.train.max_steps == 7 and cfg.optim.lr == 0.01 and cfg.model.n_kv_heads is None
    assert cfg.model.d_model == 256  # from the file
    assert cfg.optim.beta2 == 0.95  # a default
    assert cfg.data.datasets == [DatasetSpec(path="out/demo/data", weight=1.0)]


def test_every_named_config_loads():
    for path in sorted((REPO / "launch/configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.max_stepz=3"], r"train.max_stepz: unknown key \(did you mean max_steps\?\)"),
        (["optimizer.lr=3"], r"optimizer: unknown key \(did you mean optim\?\)"),
        (["train.max_steps=three"], "train.max_steps: expected an integer, got 'three'"),
        (["train.global_batch_seqs=0"], "train.global_batch_seqs: 0 must be positive"),
        (["optim.decay_steps=0"], "optim.decay_steps: 0 must be positive"),
        (["train.max_tokens=-5"], "train.max_tokens: -5 must be positive"),
        (["model.n_kv_heads=0"], "model.n_kv_heads: 0 must be positive"),
        (["model.ffn_dim=0"], "model.ffn_dim: 0 must be positive"),
        (["optim.lr=.nan"], "optim.lr: expected a finite number, got nan"),
        (["data.val_datasets=[{path: v, weight: -1}]"], r"data.val_datasets\[0\].weight: -1.0 must be positive"),
        (["train.max_steps=2.5"], "train.max_steps: expected an integer, got 2.5"),
        (["train.max_steps=0"], "train.max_steps: 0 must be positive"),
        (["optim.schedule=exp"], "optim.schedule: 'exp' is not one of 'cosine', 'linear', 'wsd', 'constant'"),
        (["model.tie_embeddings=1"], "model.tie_embeddings: expected true or false, got 1"),
        (["optim.beta2=1.0"], r"optim.beta2: 1.0 must be in \[0, 1\)"),
        (["model.n_heads=5"], "model.n_heads: 5 does not divide model.d_model 768"),
        (["model.n_kv_heads=5"], "model.n_kv_heads: 5 must divide model.n_heads 12"),
        (["train.global_batch_tokens=4096"], "set exactly one of train.global_batch_seqs, train.global_batch_tokens"),
        (
            ["train.global_batch_seqs=null", "train.global_batch_tokens=1000"],
            "1000 is not a multiple of model.seq_len 2048",
        ),
        (["data.datasets=[{path: d, weight: 0}]"], r"data.datasets\[0\].weight: 0.0 must be positive"),
        (["data.datasets=[{path: d, wieght: 2}]"], r"data.datasets\[0\].wieght: unknown key \(did you mean weight\?\)"),
        (["optim.min_lr=1.0"], "optim.min_lr: 1.0 is above optim.lr"),
        (["model.document_positions=true"], "model.document_positions: needs model.document_masking"),
        (["train"], "train: an override is key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, BASE + overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_datasets_with_weights():
    cfg = load_config(None, BASE[:1] + ["data.datasets=[{path: a, weight: 3}, b]", "train.global_batch_seqs=4"])
    assert cfg.data.datasets == [DatasetSpec("a", 3.0), DatasetSpec("b", 1.0)]
