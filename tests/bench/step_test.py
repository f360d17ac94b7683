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
