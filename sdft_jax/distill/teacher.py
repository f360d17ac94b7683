"""The teacher's weights: frozen, an exponential moving average of the student, or a periodic copy.

The teacher is the student's own architecture with its own copy of the trainable parameters, kept
in fp32 whatever the student's dtype: an EMA step moves a weight by `alpha` (1%) of its distance to
the student, which bf16 (8 significant bits) rounds away.

The functions take generic pytrees of arrays. With LoRA the caller passes only the adapter pytree:
the teacher is then the shared frozen base plus an EMA of the adapters, with no second copy of the
base weights; or, with `source = "base"`, the frozen base alone (its adapters zero, so off).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Int

from sdft_jax.validation import check_int, check_literals, check_number

TeacherMode = Literal["static", "ema", "sync"]
TeacherSource = Literal["student", "base"]
PyTree = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """How the teacher's weights follow the student's after each optimizer update.

    Attributes:
      mode: `static` (frozen at the initial weights), `ema` (teacher = (1 - ema_alpha) * teacher +
        ema_alpha * student after every update) or `sync` (a hard copy every `sync_every` updates).
      ema_alpha: the EMA rate, in (0, 1]; the paper uses 0.01 (grid 0.01 / 0.02 / 0.05).
      sync_every: the copy period of mode `sync` (>= 1); must stay 0 in the other modes.
      source: where the teacher starts. `student`: the student's starting weights. `base` (LoRA only):
        the base model the adapters modify, with the adapters off (e.g. the original model as the
        teacher of a continual experiment's second stage, while the student continues stage 1's
        adapters); mode `static` only, since an EMA or copy of the student would turn them back on.
    """

    mode: TeacherMode = "ema"
    ema_alpha: float = 0.01
    sync_every: int = 0
    source: TeacherSource = "student"

    def __post_init__(self):
        check_literals(self)
        check_number("TeacherConfig.ema_alpha", self.ema_alpha, low=0.0, high=1.0, low_open=True)
        every = check_int("TeacherConfig.sync_every", self.sync_every, minimum=0)
        if self.mode == "sync" and every < 1:
            raise ValueError(f"TeacherConfig.sync_every must be >= 1 in mode 'sync', got {every}")
        if self.mode != "sync" and every != 0:
            # A period that silently does nothing is more likely a mistake than an intent.
            raise ValueError(f"TeacherConfig.sync_every={every} is only used by mode 'sync', not {self.mode!r}")
        if self.source == "base" and self.mode != "static":
            raise ValueError(f"TeacherConfig.source='base' (the base model, adapters off) needs mode 'static', not "
                             f"{self.mode!r}: following the student would put the adapters back in the teacher")


def _is_float(x: ArrayLike) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def init_teacher(student_params: PyTree) -> PyTree:
    """An fp32 copy of the student's (trainable) parameters; non-float leaves are copied as they are.

    The copy never shares buffers with the student, so both may be donated to a jitted step.
    """
    return jax.tree.map(
        lambda x: jnp.array(x, dtype=jnp.float32 if _is_float(x) else None, copy=True), student_params
    )


def update_teacher(teacher: PyTree, student: PyTree, step: Int[Array, ""], cfg: TeacherConfig) -> PyTree:
    """The teacher after the optimizer update that brought the step count to `step`.

    Jittable (`cfg` static). The result keeps the teacher's dtypes. `student` must have the
    teacher's tree structure; in mode `sync` the copy happens when `step % sync_every == 0`.
    """
    if cfg.mode == "static":
        return teacher
    if cfg.mode == "ema":
        alpha = cfg.ema_alpha

        def ema(t: Array, s: Array) -> Array:
            if not _is_float(t):
                return jnp.asarray(s, t.dtype)
            # t + alpha * (s - t) is (1 - alpha) * t + alpha * s without its drift: in fp32 the two
            # rounded weights sum to 1 + 9e-9, and a teacher equal to the student stays exactly equal.
            return (t + alpha * (s.astype(t.dtype) - t)).astype(t.dtype)

        return jax.tree.map(ema, teacher, student)
    copy_now = jnp.asarray(step) % cfg.sync_every == 0
    return jax.tree.map(lambda t, s: jnp.where(copy_now, s.astype(t.dtype), t), teacher, student)
