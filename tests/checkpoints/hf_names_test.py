"""The per-family HF name tables: layouts by hand, and the expert layout read from tensor names."""

import numpy as np
import pytest

from sdft_jax.checkpoints import hf_names


def test_linear_transform_is_hf_transposed_and_inverts():
    # q_proj: ours [D=3, H=2, E=4], HF [H*E, D]; o_proj: ours [H, E, D], HF [D, H*E].
    q = np.arange(24.0).reshape(3, 2, 4)
    hf = hf_names.DENSE["q_proj"].transform.to_hf(q)
    np.testing.assert_array_equal(hf, q.reshape(3, 8).T)
    np.testing.assert_array_equal(hf_names.DENSE["q_proj"].transform.to_ours(hf, (3, 2, 4)), q)
    o = np.arange(24.0).reshape(2, 4, 3)
    o_t = hf_names.DENSE["o_proj"].transform
    np.testing.assert_array_equal(o_t.to_hf(o), o.reshape(8, 3).T)
    assert o_t.hf_shape((2, 4, 3)) == (3, 8)


def test_fused_experts_are_gate_rows_then_up_rows():
    # ours [E=2, D=3, F=4] each; HF gate_up_proj [E, 2F, D]: expert e's rows 0..F-1 are gate^T.
    table = hf_names.family_table("qwen3_moe", "fused")
    gate, up = table["experts_gate_proj"], table["experts_up_proj"]
    assert gate.hf_name == up.hf_name == "model.layers.{i}.mlp.experts.gate_up_proj"
    g = np.arange(24.0).reshape(2, 3, 4)
    assert gate.transform.hf_shape((2, 3, 4)) == (2, 4, 3) and gate.piece == (1, 0, 2) and up.piece == (1, 1, 2)
    np.testing.assert_array_equal(gate.transform.to_hf(g)[1], g[1].T)


def test_tables_per_family():
    assert hf_names.family_table("qwen2") == hf_names.family_table("llama") == hf_names.DENSE
    per_expert = hf_names.family_table("qwen3_moe")
    assert per_expert["experts_down_proj"].names([0, 2], 2) == [
        "model.layers.0.mlp.experts.0.down_proj.weight", "model.layers.0.mlp.experts.1.down_proj.weight",
        "model.layers.2.mlp.experts.0.down_proj.weight", "model.layers.2.mlp.experts.1.down_proj.weight"]
    assert per_expert["router"].hf_name == "model.layers.{i}.mlp.gate.weight"
    with pytest.raises(ValueError, match="expert_layout must be one of"):
        hf_names.family_table("qwen3_moe", "stacked")
    with pytest.raises(ValueError, match="no HF name table for architecture 'gpt2'"):
        hf_names.family_table("gpt2")


def test_expert_layout_of_names():
    assert hf_names.expert_layout_of_names(["model.layers.0.mlp.gate_proj.weight"]) is None
    assert hf_names.expert_layout_of_names(["model.layers.3.mlp.experts.12.up_proj.weight"]) == "per_expert"
    assert hf_names.expert_layout_of_names(["model.layers.3.mlp.experts.down_proj"]) == "fused"
    with pytest.raises(ValueError, match="both the fused and the per-expert layout"):
        hf_names.expert_layout_of_names(["model.layers.3.mlp.experts.down_proj",
                                         "model.layers.3.mlp.experts.0.up_proj.weight"])
