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
