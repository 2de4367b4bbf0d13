"""The plan of a run (pretrain/plan.py, launch/plan.py): sizes, DeepSpeed's estimators, activations, the report."""

import subprocess
import sys

import pytest

from pretrain.config import ModelConfig, load_config
from pretrain.model import Transformer
from pretrain.plan import activation_bytes, model_shape, state_breakdown, state_bytes

from ..helpers import REPO

GIB = 2**30


def test_the_shape_is_the_models_own():
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32)
    shape = model_shape(cfg)
    model = Transformer(cfg)
    assert shape.params == model.num_params() == 254_272
    assert shape.largest_layer == 1024 * 64  # the embedding (and the untied head): the largest module
    assert shape.flops_per_token == model.flops_per_token(32)


@pytest.mark.parametrize("nodes,gpus_per_node", [(1, 8), (8, 8), (2, 4)])
def test_zero2_and_zero3_are_deepspeeds_estimates_and_the_breakdown_adds_up_to_them(nodes, gpus_per_node):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(REPO / "launch/configs/7b.yaml", ["model.vocab_size=32000"])
    shape = model_shape(cfg.model)
    assert shape.params == 6_738_415_616  # Llama-2-7B's shape
    gpus = nodes * gpus_per_node
    z2 = estimate_zero2_model_states_mem_needs(shape.params, gpus_per_node, nodes, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, gpus_per_node, nodes,
                                               cpu_offload=False, cpu_offload_params=False)[1]  # fmt: skip
    assert state_bytes(shape, 2, gpus, nodes=nodes) == z2 == sum(state_breakdown(shape, 2, gpus).values())
    assert state_bytes(shape, 3, gpus, nodes=nodes) == z3 == sum(state_breakdown(shape, 3, gpus).values())
    p = shape.params  # ZeRO-0 and 1 by hand: 2 + 2 + 4 + 4 + 8 bytes, the last three (ZeRO-1) split
    assert state_bytes(shape, 0, gpus) == 20 * p and state_bytes(shape, 1, gpus) == 4 * p + 16 * p // gpus
    sizes = [state_bytes(shape, s, gpus, nodes=nodes) for s in range(4)]
    assert sizes == sorted(sizes, reverse=True)


def test_activations_by_hand_and_with_checkpointing():
    cfg = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32)
    tokens = 2 * 32
    per_layer = (7 * 64 + 2 * 32 + 4 * 256) * tokens * 2  # kv_dim 2 heads x 16; ffn 256; bf16
    head = tokens * 1024 * (2 + 4) + tokens * 64 * 2
    assert activation_bytes(cfg, 2, precision="bf16", checkpointing=False) == 2 * per_layer + head
    assert activation_bytes(cfg, 2, precision="bf16", checkpointing=True) == 2 * tokens * 64 * 2 + per_layer + head


def plan_cli(*args):
    cmd = [sys.executable, str(REPO / "launch/plan.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_7b_plan_on_8_nodes_of_8_gpus():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    r = plan_cli("--config", "launch/configs/7b.yaml", "--nodes", "8", "--gpus-per-node", "8")
    assert r.returncode == 0, r.stderr
    z3 = estimate_zero3_model_states_mem_needs(6_738_415_616, 131_072_000, 8, 8, cpu_offload=False,
                                               cpu_offload_params=False)[1]  # fmt: skip
    row = next(line for line in r.stdout.splitlines() if line.startswith("ZeRO-3"))
    assert row.split()[1] == f"{z3 / GIB:,.2f}" and row.endswith("<- this config")
    assert "model: 6.74B parameters" in r.stdout and "238,419 steps = 1.00T tokens" in r.stdout
    assert "(21.1 days) at 40% MFU of 989 TFLOP/s per GPU" in r.stdout  # 1T tokens x 46.08 GFLOP / 64 x 989T x 0.4
    assert "WARNING: ZeRO" not in r.stdout and "ZeRO-0" in r.stdout and "(does not fit)" in r.stdout  # ZeRO-0 does not


def test_a_plan_that_does_not_fit_says_what_to_change_and_bad_arguments_exit_2():
    r = plan_cli("--config", "launch/configs/7b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu", "A100")
    assert r.returncode == 0
    assert "WARNING: ZeRO-3 as configured needs" in r.stdout and "more than the 80.00 GiB of a A100" in r.stdout
    r = plan_cli("--config", "launch/configs/7b.yaml", "--gpu", "B300")
    assert r.returncode == 2 and "--gpu: 'B300' is not one of H100" in r.stderr
    r = plan_cli("--config", "launch/configs/7b.yaml", "model.n_layer=3")
    assert r.returncode == 2 and "model.n_layer: unknown key" in r.stderr
