"""Where a train step's time goes, without a profiler: its parts compiled and timed as programs of their own.

`bench accel` reports these beside the whole step (`breakdown`), so one run of the accelerator check says
which part holds the step below its MFU goal. Each part is a separate jitted program on the step's own
state and batch, built from the functions the step itself calls (`distill.train_step`):

- `teacher_forward`: `teacher_targets`, the teacher's forward to its final hidden states at the
  completion positions (no LM head: that is in `loss`).
- `student_forward_backward`: the student's forward over `student_prompt ++ completion` and the backward
  of a stand-in loss on its completion hidden states (the sum of their squares), so the layers' work
  without the LM head or the SDFT loss.
- `loss`: `losses.chunked_loss` with the step's `LossConfig` and its gradient with respect to the
  student's hidden states and LM head, on the two LM heads of the state and stand-in (random) hidden
  states of the completion's shape: every LM-head matmul of the step, the softmaxes and the top-k.
- `gradients`: `step_gradients`, the three together as the step runs them (micro-batches included);
  the whole step less the optimizer and teacher updates.

A program of its own reads its inputs from memory and writes its outputs, where inside the step XLA may
fuse across the boundary, so the parts need not add up to `gradients` exactly; `gradients` against the
step is the optimizer's and the teacher update's share.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sdft_jax.distill.batch import StepBatch
from sdft_jax.distill.losses import chunked_loss
from sdft_jax.distill.train_state import TrainState
from sdft_jax.distill.train_step import (
    StepConfig,
    completion_hidden,
    micro_batch_count,
    model_forward,
    step_gradients,
    teacher_targets,
)

PARTS = ("teacher_forward", "student_forward_backward", "loss", "gradients")


def part_programs(
    graphdef: nnx.GraphDef, state: TrainState, batch: StepBatch, cfg: StepConfig
) -> dict[str, tuple[Callable, tuple]]:
    """Each part of `PARTS` as `(jitted function, its arguments)` (see the module docstring). Needs a
    loss with a teacher (not `sft`) and the whole batch at once (`micro_batch_size` 0)."""
    if cfg.loss.name == "sft":
        raise ValueError("the step's parts are for an SDFT loss with a teacher, not 'sft'")
    if micro_batch_count(batch.rows, cfg) != 1:
        raise ValueError("the step's parts are timed on the whole batch at once (micro_batch_size 0)")
    C = batch.completion_len

    teacher = jax.jit(lambda state, batch: teacher_targets(graphdef, state, batch))

    def student_stand_in(params: nnx.State, state: TrainState, batch: StepBatch) -> jax.Array:
        student = nnx.merge(graphdef, params, state.frozen)
        out = model_forward(student, batch.student_tokens, batch.student_mask)
        hidden = completion_hidden(out.hidden, batch.student_prompt_len, C)
        return jnp.sum(jnp.square(hidden.astype(jnp.float32)))

    student = jax.jit(lambda state, batch: jax.value_and_grad(student_stand_in)(state.params, state, batch))

    # The loss part's inputs: the real heads, stand-in hidden states of the teacher's shape and dtype.
    hidden_shape, _ = jax.eval_shape(teacher, state, batch)
    heads = jax.jit(lambda state: tuple(nnx.merge(graphdef, params, state.frozen).head()
                                        for params in (state.params, state.teacher)))
    student_head, teacher_head = heads(state)
    keys = jax.random.split(jax.random.key(0))
    hidden, teacher_hidden = (jax.random.normal(key, hidden_shape.shape, jnp.float32).astype(hidden_shape.dtype)
                              for key in keys)

    def loss_value(hidden, head, teacher_hidden, teacher_head, mask):
        return chunked_loss(hidden, head, mask, cfg.loss, teacher_hidden=teacher_hidden, teacher_head=teacher_head)[0]

    loss = jax.jit(jax.value_and_grad(loss_value, argnums=(0, 1)))
    gradients = jax.jit(lambda state, batch: step_gradients(graphdef, state, batch, cfg))
    return {
        "teacher_forward": (teacher, (state, batch)),
        "student_forward_backward": (student, (state, batch)),
        "loss": (loss, (hidden, student_head, teacher_hidden, teacher_head, batch.completion_mask)),
        "gradients": (gradients, (state, batch)),
    }


def time_parts(programs: dict[str, tuple[Callable, tuple]], *, runs: int) -> dict[str, dict]:
    """`{part: {"compile_s", "seconds"}}`: each program compiled, called once, then the median of `runs`
    calls (each waited for)."""
    timed = {}
    for name, (fn, args) in programs.items():
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        timed[name] = dict(compile_s=round(compile_s, 2), seconds=round(statistics.median(times), 6))
        del compiled
    return timed
