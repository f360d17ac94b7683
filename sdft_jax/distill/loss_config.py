"""Which SDFT loss to compute, how to reduce it and how to chunk it: `LossConfig`.

It has a module of its own because every loss module reads it: the per-token math
(`token_terms.py`), the blocked backward (`head_grad.py`) and the public paths (`losses.py`, which
also exports it).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from sdft_jax.validation import check_bool, check_int, check_literals, check_number

LossName = Literal["topk", "full_kl", "reverse_topk", "importance_sampling", "jsd", "sft"]
Reduction = Literal["sequence_mean", "token_mean", "sum"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Which SDFT loss to compute and how to reduce it.

    Attributes:
      name: the per-position loss (see the SDFT spec, section 3).
      top_k: how many of the teacher's most likely tokens `topk` and `reverse_topk` use.
      jsd_beta: weight of the teacher in the `jsd` mixture; 0 is forward KL(T||S), 1 is reverse KL(S||T).
      reduction: `sequence_mean` (mean per sequence, then over sequences), `token_mean` or `sum`.
      skip_first_tokens: completion positions `t < skip_first_tokens` are not scored by `topk`,
        `full_kl`, `reverse_topk` and `jsd` (`importance_sampling` and `sft` score every position).
      chunk_size: at most this many tokens (of the whole batch) per chunk in `chunked_loss`.
      vocab_chunk_size: N > 0 = `chunked_loss`'s backward runs over blocks of N vocab columns
        (`head_grad.py`; every loss but `jsd`), so the LM head's gradient is never held twice; 0 = plain
        autodiff, which accumulates it over token chunks in a second [D, V] buffer. Use 0 when the
        vocabulary is split over the `tensor` mesh axis (each block would gather its slice of the head).
      gather_head: in a sharded step (`models.sharding.activation_sharding`), `chunked_loss` gathers each
        LM head whole over the mesh axes its hidden dimension is split over (data / fsdp; a vocabulary
        split over `tensor` stays split) once, before its chunk loops, instead of XLA gathering it inside
        them, again in every chunk and vocabulary block, and reducing the head's gradient there too. Costs
        per device the gathered heads (the student's in fp32, for its gradient; the teacher's in its
        hidden states' dtype) and the student head's whole fp32 gradient (docs/benchmarks.md: Qwen3-8B
        on 32 v5p chips, 131 GB less all-gathered and 83 GB less all-reduced per step, +3.7 GB). False:
        the head stays split, for a vocabulary too large to hold whole.
    """

    name: LossName = "topk"
    top_k: int = 20
    jsd_beta: float = 0.5
    reduction: Reduction = "sequence_mean"
    skip_first_tokens: int = 3
    chunk_size: int = 256
    vocab_chunk_size: int = 16384
    gather_head: bool = True

    def __post_init__(self):
        check_literals(self)
        check_int("LossConfig.top_k", self.top_k, minimum=1)
        check_number("LossConfig.jsd_beta", self.jsd_beta, low=0, high=1)
        check_int("LossConfig.skip_first_tokens", self.skip_first_tokens, minimum=0)
        check_int("LossConfig.chunk_size", self.chunk_size, minimum=1)
        check_int("LossConfig.vocab_chunk_size", self.vocab_chunk_size, minimum=0)
        check_bool("LossConfig.gather_head", self.gather_head)
