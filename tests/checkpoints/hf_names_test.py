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
    g, u = np.arange(24.0).reshape(2, 3, 4), 100 + np.arange(24.0).reshape(2, 3, 4)
    shapes = {"experts_gate_proj": (2, 3, 4), "experts_up_proj": (2, 3, 4)}
    assert hf_names.hf_shape("experts_up_proj", table, shapes) == (2, 8, 3)
    parts = {"experts_gate_proj": gate.transform.to_hf(g), "experts_up_proj": up.transform.to_hf(u)}
    fused = hf_names.join_pieces(parts, gate.piece, shapes)
    np.testing.assert_array_equal(fused, np.concatenate([g.swapaxes(1, 2), u.swapaxes(1, 2)], axis=1))
    for name, ours in (("experts_gate_proj", g), ("experts_up_proj", u)):
        piece = hf_names.take_piece(fused, name, table, shapes)
        np.testing.assert_array_equal(table[name].transform.to_ours(piece, (2, 3, 4)), ours)


def test_qwen3_5_in_proj_qkv_holds_q_k_v_rows_of_unequal_sizes():
    # D=3, Hk=2, Dk=2 (q, k: 4 rows each), Hv=3, Dv=2 (v: 6 rows): in_proj_qkv [14, 3].
    table = hf_names.family_table("qwen3_5")
    shapes = {"linear_q_proj": (3, 2, 2), "linear_k_proj": (3, 2, 2), "linear_v_proj": (3, 3, 2)}
    hf = np.arange(42.0).reshape(14, 3)
    assert hf_names.hf_shape("linear_v_proj", table, shapes) == (14, 3)
    rows = {"linear_q_proj": hf[0:4], "linear_k_proj": hf[4:8], "linear_v_proj": hf[8:14]}
    parts = {}
    for name, want in rows.items():
        entry = table[name]
        assert entry.hf_name == "model.layers.{i}.linear_attn.in_proj_qkv.weight"
        ours = entry.transform.to_ours(hf_names.take_piece(hf, name, table, shapes), shapes[name])
        np.testing.assert_array_equal(ours.reshape(3, -1), want.T)  # ours [D, heads, dim]: row h*dim+d
        parts[name] = entry.transform.to_hf(ours)
    np.testing.assert_array_equal(hf_names.join_pieces(parts, table["linear_q_proj"].piece, shapes), hf)


def test_qwen3_5_conv1d_channels_are_q_k_v_and_the_kernel_is_ours_first_axis():
    # K=4; q, k [K, Hk=1, Dk=2], v [K, Hv=2, Dv=2]: conv1d.weight [8, 1, 4], channel c, tap t.
    table = hf_names.family_table("qwen3_5")
    shapes = {"linear_q_conv": (4, 1, 2), "linear_k_conv": (4, 1, 2), "linear_v_conv": (4, 2, 2)}
    hf = np.arange(32.0).reshape(8, 1, 4)
    assert hf_names.hf_shape("linear_k_conv", table, shapes) == (8, 1, 4)
    v = table["linear_v_conv"].transform.to_ours(hf_names.take_piece(hf, "linear_v_conv", table, shapes), (4, 2, 2))
    for t in range(4):
        for h in range(2):
            for d in range(2):
                assert v[t, h, d] == hf[4 + 2 * h + d, 0, t]
    k = table["linear_k_conv"].transform.to_ours(hf_names.take_piece(hf, "linear_k_conv", table, shapes), (4, 1, 2))
    np.testing.assert_array_equal(k[:, 0, :], hf[2:4, 0, :].T)
    np.testing.assert_array_equal(table["linear_v_conv"].transform.to_hf(v), hf[4:])


def test_qwen3_5_q_proj_interleaves_query_and_gate_rows_per_head():
    # H=2 heads of hd=3, D=5: HF q_proj [H * 2 hd, D] = per head 3 query rows then 3 gate rows.
    table = hf_names.family_table("qwen3_5")
    shapes = {"q_proj": (5, 2, 3), "q_gate_proj": (5, 2, 3)}
    hf = np.arange(60.0).reshape(12, 5)
    assert hf_names.hf_shape("q_gate_proj", table, shapes) == (12, 5)
    per_head = hf.reshape(2, 6, 5)
    q = table["q_proj"].transform.to_ours(hf_names.take_piece(hf, "q_proj", table, shapes), (5, 2, 3))
    gate = table["q_gate_proj"].transform.to_ours(hf_names.take_piece(hf, "q_gate_proj", table, shapes), (5, 2, 3))
    for h in range(2):
        np.testing.assert_array_equal(q[:, h, :], per_head[h, :3].T)
        np.testing.assert_array_equal(gate[:, h, :], per_head[h, 3:].T)
    parts = {"q_proj": table["q_proj"].transform.to_hf(q), "q_gate_proj": table["q_gate_proj"].transform.to_hf(gate)}
    np.testing.assert_array_equal(hf_names.join_pieces(parts, table["q_proj"].piece, shapes), hf)
    with pytest.raises(ValueError, match=r"lacks \['q_gate_proj'\]"):
        hf_names.join_pieces({"q_proj": parts["q_proj"]}, table["q_proj"].piece, shapes)


def test_qwen3_5_tables_and_layouts():
    causal = hf_names.family_table("qwen3_5")
    assert causal["linear_a_log"].hf_name == "model.layers.{i}.linear_attn.A_log"
    assert causal["linear_out_proj"].transform.hf_shape((4, 8, 64)) == (64, 32)
    assert causal["k_proj"] == hf_names.DENSE["k_proj"] and "router" not in causal
    nested = hf_names.family_table("qwen3_5_moe", "fused", "conditional_generation")
    assert nested["embed"].hf_name == "model.language_model.embed_tokens.weight"
    assert nested["lm_head"].hf_name == "lm_head.weight"
    assert nested["experts_down_proj"].hf_name == "model.language_model.layers.{i}.mlp.experts.down_proj"
    assert nested["shared_expert_gate"].hf_name == "model.language_model.layers.{i}.mlp.shared_expert_gate.weight"
    assert hf_names.unused_prefixes("qwen3_5_moe") == ("model.visual.", "mtp.")
    assert not hf_names.unused_prefixes("qwen3")
    with pytest.raises(ValueError, match="qwen3 checkpoints have the causal_lm layout only"):
        hf_names.family_table("qwen3", layout="conditional_generation")
    with pytest.raises(ValueError, match="layout must be one of"):
        hf_names.family_table("qwen3_5", layout="vision")


def test_model_layout_of_names():
    assert hf_names.model_layout_of_names(["model.layers.0.mlp.up_proj.weight", "lm_head.weight"]) == "causal_lm"
    assert hf_names.model_layout_of_names(["model.language_model.norm.weight", "model.visual.merger.norm.weight",
                                           "mtp.fc.weight", "lm_head.weight"]) == "conditional_generation"
    with pytest.raises(ValueError, match="both under model.language_model. and model."):
        hf_names.model_layout_of_names(["model.language_model.norm.weight", "model.norm.weight"])


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
    # An MTP head's experts (per expert) do not make a fused checkpoint mixed.
    assert hf_names.expert_layout_of_names(["model.language_model.layers.0.mlp.experts.down_proj",
                                            "mtp.layers.0.mlp.experts.0.up_proj.weight"]) == "fused"
