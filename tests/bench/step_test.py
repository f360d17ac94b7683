"""The step bench's FLOP count: causal query blocks skip exactly the (query, key) pairs after each block."""

from sdft_jax.bench.step import step_flops
from sdft_jax.testing.tiny import tiny_config


def test_step_flops_count_the_attention_as_computed():
    cfg = tiny_config("llama")
    shapes = dict(batch=3, prompt_len=6, teacher_prompt_len=8, completion_len=4)
    one_block = step_flops(cfg, **shapes, query_block=0)
    blocked = step_flops(cfg, **shapes, query_block=4)
    # Student rows are 6 + 4 = 10 tokens: blocks [0, 4), [4, 8), [8, 10) score 4*4 + 4*8 + 2*10 = 68
    # (query, key) pairs of 100. Teacher rows are 8 + 4 = 12: 4*4 + 4*8 + 4*12 = 96 of 144.
    skipped_student, skipped_teacher = 100 - 68, 144 - 96
    per_pair = 2 * 2 * cfg.num_layers * shapes["batch"] * cfg.num_heads * cfg.head_dim  # q.k and p.v
    # The student's attention is counted three times (forward, and twice in the backward pass).
    assert one_block - blocked == per_pair * (3 * skipped_student + skipped_teacher)
    assert step_flops(cfg, **shapes, query_block=16) == one_block  # one block when it covers the row


def test_step_flops_count_a_moe_layers_active_experts():
    from sdft_jax.models.moe import MoeConfig

    moe = MoeConfig(num_experts=8, top_k=2, expert_hidden=24)
    dense = tiny_config("qwen3", num_layers=3)
    sparse = tiny_config("qwen3_moe", num_layers=3, moe=moe, dense_layers=(1,))
    shapes = dict(batch=2, prompt_len=5, teacher_prompt_len=7, completion_len=3, query_block=0)
    # Layers 0 and 2 swap the dense MLP (3 D F multiply-adds per token) for the router (D E) and two experts.
    D, F = dense.hidden_size, dense.intermediate_size
    per_token = 2 * 2 * (D * 8 + 3 * D * 24 * 2 - 3 * D * F)
    # Tokens: the teacher's forward once, the student's three times (forward and backward).
    tokens = 2 * ((7 + 3) + 3 * (5 + 3))
    assert step_flops(sparse, **shapes) - step_flops(dense, **shapes) == per_token * tokens


def test_step_flops_count_gated_deltanet_and_gated_attention_layers():
    # tiny Qwen3.5: layers 0, 1, 2, 4 Gated DeltaNet (2 key heads, 4 value heads of 8), layer 3 gated
    # attention (4 query heads of 16 over 2 KV heads); D 64, F 96, vocabulary 320.
    cfg = tiny_config("qwen3_5")
    shapes = dict(batch=2, prompt_len=5, teacher_prompt_len=7, completion_len=3, query_block=0)
    D, F, V = 64, 96, 320
    attention = D * 4 * 16 * 2 + 2 * D * 2 * 16 + 4 * 16 * D  # q_proj rows doubled by the output gate
    projections = D * (2 * 2 * 8 + 2 * 4 * 8 + 2 * 4) + 4 * 8 * D  # q, k, v, z, b, a; out
    rule = 4 * (64 * (3 * 8 + 2 * 8) + 3 * 8 * 8)  # per value head: chunk of 64 products, state reads/write
    per_token = 2 * (attention + 4 * (projections + rule) + 5 * 3 * D * F)

    def forward(length):  # one attention layer scores all (query, key) pairs of a row: length^2
        return per_token * 2 * length + 2 * 2 * 1 * 2 * length * length * 4 * 16

    head = 2 * D * V * 2 * 3
    expected = forward(7 + 3) + head + 3 * forward(5 + 3) + 4 * head
    assert step_flops(cfg, **shapes) == expected


def test_random_adapters_are_our_models_adapters():
    """The torch process's adapters (built from shapes) have our model's names, layers and shapes; A in
    the fan-in bound, B zero, as ours start."""
    import numpy as np
    from flax import nnx

    from sdft_jax.bench.torch_step import random_adapters
    from sdft_jax.models import decoder
    from sdft_jax.models.lora import EXPERT_PROJECTIONS, LoraConfig
    from sdft_jax.models.transformer import Transformer

    cfg = tiny_config("qwen3_5_moe")
    lora = LoraConfig(rank=4, alpha=8.0)
    layers = Transformer(cfg, rngs=nnx.Rngs(0), lora=lora).layers
    stacked_over = {name: decoder.part_layers(cfg)[part]
                    for part, shapes in decoder.part_shapes(cfg).items() for name in shapes}
    ours = {}
    for name in layers.adapted:
        a, b = getattr(layers, f"{name}_lora_a")[...], getattr(layers, f"{name}_lora_b")[...]
        for j, layer in enumerate(stacked_over[name]):
            if name in EXPERT_PROJECTIONS:
                ours[(layer, name)] = (a[j].shape, b[j].shape)
            else:  # flattened, as the torch reference takes them
                ours[(layer, name)] = ((int(np.prod(a.shape[1:-1])), a.shape[-1]), (b.shape[1], int(np.prod(b.shape[2:]))))
    assert len(ours) == 4 * 7 + 1 * 5 + 5 * 6  # DeltaNet's 7 in 4 layers, attention's 5 in 1, MoE's 6 in 5
    theirs = random_adapters(cfg, lora)
    assert theirs["scale"] == lora.scale == 2.0
    assert {k: (a.shape, b.shape) for k, (a, b) in theirs["adapters"].items()} == ours
    a, b = theirs["adapters"][(0, "linear_out_proj")]  # fan-in Hv * Dv = 32
    assert 0 < np.abs(a).max() <= 32**-0.5 and not b.any()


def test_profile_writes_a_trace_whose_ops_are_in_the_hlo(tiny_model_dir, tmp_path, capsys):
    """--profile: one more traced call of our step; its op events are named as the compiled HLO's ops."""
    import glob
    import gzip
    import json
    import re

    from sdft_jax.bench.step import main

    out = tmp_path / "profile"
    assert main(["--model", tiny_model_dir("llama"), "--engines", "jax", "--runs", "1", "--batch", "2",
                 "--prompt-len", "8", "--teacher-prompt-len", "12", "--completion-len", "4",
                 "--profile", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["profile"] == str(out)
    hlo = (out / "step_hlo.txt").read_text()
    ops = set(re.findall(r"^\s*(?:ROOT )?%(\S+) = ", hlo, re.M))
    trace, = glob.glob(str(out / "**" / "perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    named = {e["name"] for e in events if e.get("ph") == "X"} & ops
    assert any(name.startswith(("dot", "ynn_fusion", "fusion")) for name in named), sorted(named)[:20]


def test_step_flops_parts_add_up_to_the_step():
    from sdft_jax.bench.step import step_flops_parts

    cfg = tiny_config("qwen3")
    B, C = 3, 4
    parts = step_flops_parts(cfg, B, 6, 6, C, query_block=4)
    assert sum(parts.values()) == step_flops(cfg, B, 6, 6, C, query_block=4)
    # Five [B*C, D] x [D, V] head matmuls: the teacher's logits; the student's forward, recompute, d_hidden, d_head.
    assert parts["loss"] == 5 * 2 * B * C * cfg.hidden_size * cfg.vocab_size
    # Same prompt length for both: the student's layers are the teacher's forward three times (forward, backward 2x).
    assert parts["student_forward_backward"] == 3 * parts["teacher_forward"]
