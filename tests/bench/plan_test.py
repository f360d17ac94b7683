"""`bench plan`: the per-device bytes of the compiled programs against hand counts from the parameter
shapes and the sharding rules, the fit verdict, the TPU compiler's slices, and the shipped model configs."""

import json
import math
import os

import jax
import pytest
from flax import nnx

from sdft_jax.bench.__main__ import main as bench_main
from sdft_jax.bench.plan import (CHIP_HBM_GIB, GIB, judged, load_config_file, model_config_path, plan,
                                 tpu_topology)
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.transformer import Transformer

CONFIGS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))

# Prompts of at most 32 tokens (bucket 32), completions of 8, 8 rows per step.
CONFIG_FILE = """
from sdft_jax.testing.configs import tiny_config

MESHES = {{"fsdp": {{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}},
          "one": {{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}}}}


def get_config(variant="fsdp"):
    c = tiny_config({model!r}, {run!r}, **MESHES[variant])
    c.prompts.max_prompt_tokens = 32
    c.rollout.prompt_buckets = "16,32"
    c.train.prompts_per_step = 8
    return c
"""


@pytest.fixture(scope="module")
def config_file(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tiny_plan.py"
    path.write_text(CONFIG_FILE.format(model=tiny_model_dir("qwen3"), run=str(path.parent / "run")))
    return str(path)


def by_hand_fsdp_bytes(model_dir: str, shards: int) -> int:
    """Bytes per device of the model's parameters in fp32 when split `shards` ways over fsdp: the rule
    `embed -> fsdp` splits the one dimension named `embed` of every parameter that has one (when it
    divides), nothing else is split."""
    cfg = ModelConfig.from_hf(model_dir)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    total = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = math.prod(var.shape)
        dims = dict(zip(var.axes, var.shape))
        if "embed" in dims and dims["embed"] % shards == 0:
            size //= shards
        total += 4 * size
    return total


def test_train_state_and_arguments_match_hand_counts_on_8_devices(config_file, tiny_model_dir):
    row = plan({"config": config_file + ":fsdp", "devices": 8, "chip": "v5p", "headroom": 0.15})
    assert row["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    params = by_hand_fsdp_bytes(tiny_model_dir("qwen3"), 8)
    state = row["state_bytes_per_device"]
    # Full fine-tuning: fp32 masters, the teacher's fp32 copy, Adam's two moments (laid out like the
    # parameters) and its step count and the schedule's (int32, replicated); nothing frozen.
    assert state["params"] == params and state["teacher"] == params and state["frozen"] == 0
    assert state["opt_state"] == 2 * params + 2 * 4
    assert state["other"] == 4 + 2 * 4  # the step (int32) and the PRNG key data (2 x uint32)
    assert state["total"] == 4 * params + 8 + 12

    step = row["programs"]["train_step"]
    assert step["shapes"] == {"rows": 8, "prompt_len": 32, "completion_len": 8, "micro_batch_size": 0}
    # One row per device: student and teacher tokens (int32) and masks (bool) of 32 + 8 columns and the
    # completion mask (bool) of 8. The top-k loss does not read the sampler's log-probs: jit drops them.
    batch = 2 * (40 * 4 + 40) + 8
    memory = step["per_device_bytes"]
    assert memory["arguments"] == state["total"] + batch
    assert memory["aliased"] == state["total"]  # the state is donated and updated in place
    assert memory["peak"] == memory["arguments"] + memory["outputs"] + memory["temporaries"] - memory["aliased"]
    assert memory["temporaries"] > 0 and step["fits"]
    assert step["collectives"]["all-gather"]["count"] > 0  # FSDP gathers every weight it uses
    # An fp32 config asks for fp32 matmuls only; the step has no loop of unknown trip count.
    assert set(step["matmul_flops"]) == {"f32"} and step["matmul_loops_counted_once"] == 0

    rollout = row["programs"]["rollout"]
    assert rollout["shapes"] == {"rows": 8, "calls": 1, "prompt_len": 32, "max_new_tokens": 8, "cache_len": 39}
    r = rollout["per_device_bytes"]
    assert r["resident"] == state["total"]  # the train state stays on the device beside the rollout weights
    # The rollout weights on an accelerator chip: every weight in bf16 (half its fp32 bytes), whole on
    # every device (the rollout rules replicate over fsdp; the tensor axis is 1).
    weights = by_hand_fsdp_bytes(tiny_model_dir("qwen3"), 1) // 2
    assert rollout["dtype"] == "bfloat16" and rollout["weights_bytes"] == weights
    # Arguments: the weights, one row's prompt tokens (int32), mask and id, the key (2 x uint32), and the
    # donated cache's keys and values (2 layers, 1 row, 39 slots, 2 KV heads of 16, bf16 like the weights);
    # its slot bookkeeping (`valid`, `index`), which `sample` resets, jit drops.
    keys_values = 2 * (2 * 1 * 39 * 2 * 16 * 2)
    assert rollout["cache_bytes"] == keys_values + 39 + 4
    assert r["arguments"] == weights + 32 * 4 + 32 + 4 + 8 + keys_values
    assert r["aliased"] == keys_values  # updated in place
    assert "all-gather" not in rollout["collectives"]  # the weights are whole: nothing gathered per decoded token
    # The rollout weights and cache are bf16: bf16 matmuls only; the decode loop's trip count is unknown.
    assert set(rollout["matmul_flops"]) == {"bf16"} and rollout["matmul_loops_counted_once"] == 1
    assert row["fits"] and row["per_device_bytes"] == max(memory["peak"], r["peak"])
    assert row["parameters"] == row["trained_parameters"] == by_hand_fsdp_bytes(tiny_model_dir("qwen3"), 1) // 4


@pytest.mark.slow
def test_tpu_compiler_plans_a_v5p_slice_with_the_same_state_and_arguments(config_file, tiny_model_dir):
    """`--compiler tpu`: libtpu's compiler, ahead of time for a v5p slice of 8 chips, in this CPU process.
    The state is what the XLA:CPU plan's test counts by hand; the compiler's argument bytes are at least
    that (a TPU lays arrays out in tiles of 8 x 128 elements: this tiny model's small dimensions pad)."""
    pytest.importorskip("libtpu", reason="the TPU compiler; the test extra installs it")
    row = plan({"config": config_file + ":fsdp", "devices": 8, "chip": "v5p", "headroom": 0.15,
                "compiler": "tpu", "topology": tpu_topology("v5p", 8)})
    assert (row["backend"], row["compiler"], row["topology"]) == ("tpu", "tpu", "v5p:2x2x2")
    params = by_hand_fsdp_bytes(tiny_model_dir("qwen3"), 8)
    assert row["state_bytes_per_device"]["total"] == 4 * params + 8 + 12
    step = row["programs"]["train_step"]["per_device_bytes"]
    batch = 2 * (40 * 4 + 40) + 8
    assert step["arguments"] >= row["state_bytes_per_device"]["total"] + batch
    assert row["state_bytes_per_device"]["total"] <= step["aliased"] < step["arguments"]  # the state, donated
    assert step["peak"] == step["arguments"] + step["outputs"] + step["temporaries"] - step["aliased"]
    assert step["temporaries"] > 0 and step["generated_code"] > 0  # a TPU program: its code is on the device
    rollout = row["programs"]["rollout"]
    weights = by_hand_fsdp_bytes(tiny_model_dir("qwen3"), 1) // 2  # bf16, whole on every chip
    assert rollout["dtype"] == "bfloat16" and rollout["weights_bytes"] == weights
    assert rollout["per_device_bytes"]["arguments"] >= weights + 32 * 4 + 32 + 4 + 8 + 2 * (2 * 1 * 39 * 2 * 16 * 2)
    assert row["fits"]


def test_fits_follows_the_capacity():
    row = {"programs": {"train_step": {"per_device_bytes": {"peak": 10 * GIB}},
                        "rollout": {"per_device_bytes": {"peak": 6 * GIB}}}}
    roomy = judged(row, hbm_gib=CHIP_HBM_GIB["v6e"], headroom=0.15)
    assert roomy["fits"] and roomy["per_device_bytes"] == 10 * GIB and roomy["budget_bytes"] == int(32 * GIB * 0.85)
    tight = judged(row, hbm_gib=11, headroom=0.15)  # 9.35 GiB usable: the step no longer fits, the rollout does
    assert not tight["fits"]
    assert not tight["programs"]["train_step"]["fits"] and tight["programs"]["rollout"]["fits"]


@pytest.mark.slow
def test_command_on_one_device_has_no_collectives_and_reports_no_fit(config_file, capsys):
    code = bench_main(["plan", f"--config={config_file}:one", "--devices", "1", "--chip", "h100", "--hbm-gib",
                       "0.001", "--set", "train.prompts_per_step=2", "--peak-buffers", "3", "--json"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 3 and not row["fits"] and row["hbm_bytes"] == int(0.001 * GIB)
    assert row["set"] == ["train.prompts_per_step=2"] and row["programs"]["train_step"]["shapes"]["rows"] == 2
    for program in row["programs"].values():
        assert program["collectives"] == {} and not program["fits"]
        peak = program["peak_buffers"]  # the 3 largest shapes live at the peak, largest first
        sizes = [b["bytes"] for b in peak["by_shape"]]
        assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True) and sum(sizes) <= peak["live_bytes"]


def test_bad_arguments_fail_in_one_line(config_file, capsys):
    assert bench_main(["plan", f"--config={config_file}:one", "--devices", "1", "--chip", "v5p",
                       "--set", "train.no_such_key=1", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.no_such_key" in err[0]
    # A value of another type than the key's (a tuple field is a comma-joined string in the config).
    assert bench_main(["plan", f"--config={config_file}:one", "--devices", "1", "--chip", "v5p",
                       "--set", "rollout.sharding=('embed=fsdp',)", "--json"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rollout.sharding takes a str, not tuple" in err[0], err
    # A TPU slice that is not CHIP:AxB[xC], or whose chips are not --devices.
    for topology, message in (("v5p-8", "--topology 'v5p-8': expected CHIP:AxB[xC]"),
                              ("v5p:2x2x1", "4 devices in slice v5p:2x2x1, 8 asked for")):
        assert bench_main(["plan", f"--config={config_file}:fsdp", "--devices", "8", "--chip", "v5p",
                           "--compiler", "tpu", "--topology", topology, "--json"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_tpu_slices_grow_from_one_host_by_doubling_the_last_smallest_dimension():
    assert [tpu_topology("v5p", n) for n in (1, 2, 4, 8, 16, 32, 64, 128)] == [
        "v5p:1x1x1", "v5p:1x2x1", "v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8"]
    assert [tpu_topology("v6e", n) for n in (4, 8, 16, 32, 64, 256)] == [
        "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:16x16"]
    with pytest.raises(ValueError, match="power of two"):
        tpu_topology("v5p", 24)
    with pytest.raises(ValueError, match="not a TPU"):
        tpu_topology("h100", 8)


@pytest.mark.parametrize("config, parameters, architecture", [
    ("qwen3_8b_tpu.py", 8_190_735_360, "qwen3"),
    ("qwen3_5_35b_a3b.py", 34_660_610_688, "qwen3_5_moe"),
    ("qwen3_30b_a3b.py", 30_532_122_624, "qwen3_moe"),
])
def test_shipped_model_configs_are_found_and_have_the_published_sizes(config, parameters, architecture):
    path = os.path.join(CONFIGS, config)
    found = model_config_path(load_config_file(path), path, None)
    assert os.path.dirname(found) == os.path.join(os.path.dirname(path), "models")
    cfg = ModelConfig.from_hf(found)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    assert cfg.architecture == architecture
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model))) == parameters


def test_a_model_without_a_config_json_asks_for_one(config_file):
    cfg = load_config_file(config_file + ":one", ("model.name='/nowhere/some-model'",))
    with pytest.raises(FileNotFoundError, match="--model-config"):
        model_config_path(cfg, config_file, None)
