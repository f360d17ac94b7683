"""`StepBatch`: the arrays one train step consumes, laid out so alignment is a static slice.

Each sequence is `left-padded prompt ++ completion (right-padded)`. With prompts left-padded to a
bucket length P, completion token t sits at column P + t in every row and is predicted by column
P - 1 + t: exactly the spec's `len(prompt) - 1 + t`, counted over real tokens. Student and teacher
sequences share the completion columns; only their prompt widths differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.padding import bucket_length, pad_rows
from sdft_jax.pytrees import pytree_dataclass


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    """Host or device arrays of one step. Shapes: B rows, Ps/Pt prompt widths, C completion width;
    the student sequences are Ls = Ps + C wide, the teacher's Lt = Pt + C."""

    student_tokens: Int[np.ndarray | Array, "B Ls"]
    student_mask: Bool[np.ndarray | Array, "B Ls"]
    teacher_tokens: Int[np.ndarray | Array, "B Lt"]
    teacher_mask: Bool[np.ndarray | Array, "B Lt"]
    completion_mask: Bool[np.ndarray | Array, "B C"]  # real completion tokens that are scored candidates
    sampler_logprobs: Float[np.ndarray | Array, "B C"]  # log-prob of each token under the sampling policy (lp_old)

    @property
    def completion_len(self) -> int:
        return self.completion_mask.shape[1]

    @property
    def student_prompt_len(self) -> int:
        return self.student_tokens.shape[1] - self.completion_len

    @property
    def teacher_prompt_len(self) -> int:
        return self.teacher_tokens.shape[1] - self.completion_len

    @property
    def completion_tokens(self) -> Int[np.ndarray | Array, "B C"]:
        return self.student_tokens[:, self.student_prompt_len:]

    @property
    def rows(self) -> int:
        return self.student_tokens.shape[0]


def split_rows(batch: StepBatch, parts: int) -> StepBatch:
    """The rows of `batch` as `parts` micro-batches stacked on a new leading axis (every array
    `[B, ...]` becomes `[parts, B / parts, ...]`; index it, or scan over it, for one micro-batch).

    Micro-batch i holds rows i, i + parts, i + 2 * parts, ...: strided, so that when the rows are split
    over devices in contiguous blocks (`distributed.global_batch`) and `B / parts` splits over the same
    devices, every micro-batch takes an equal share of each device's rows and no row moves between
    devices. Works on host and device arrays, inside `jit` too.
    """
    if parts < 1 or batch.rows % parts:
        raise ValueError(f"split_rows: {batch.rows} rows do not split into {parts} micro-batches")
    return jax.tree.map(lambda x: x.reshape(batch.rows // parts, parts, *x.shape[1:]).swapaxes(0, 1), batch)


def _pad_prompts(prompts: Sequence[Sequence[int]], buckets: Sequence[int] | None,
                 pad_id: int) -> tuple[Int[np.ndarray, "B P"], Bool[np.ndarray, "B P"]]:
    """The prompts left-padded to the bucket of the longest."""
    for i, row in enumerate(prompts):
        if len(row) == 0:
            raise ValueError(f"row {i}: empty prompt")
    width = bucket_length(max(len(p) for p in prompts), buckets)
    return pad_rows(prompts, width, pad_value=pad_id, side="left")


def make_step_batch(
    student_prompts: Sequence[Sequence[int]],
    teacher_prompts: Sequence[Sequence[int]] | None,
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    sampler_logprobs: Sequence[Sequence[float]] | None = None,
    prompt_buckets: Sequence[int] | None = None,
    completion_buckets: Sequence[int] | None = None,
    max_seq_len: int | None = None,
) -> StepBatch:
    """Pads prompts (left) and completions (right) into a StepBatch.

    `teacher_prompts=None` (SFT) reuses the student sequences. Completion tokens that would run past
    `max_seq_len` in either sequence are cut and excluded from the mask.
    """
    if not (len(student_prompts) == len(completions) and (teacher_prompts is None or len(teacher_prompts) == len(completions))):
        raise ValueError("make_step_batch: prompts and completions differ in number of rows")
    s_prompt, s_prompt_mask = _pad_prompts(student_prompts, prompt_buckets, pad_id)
    ps = s_prompt.shape[1]
    if teacher_prompts is not None:
        t_prompt, t_prompt_mask = _pad_prompts(teacher_prompts, prompt_buckets, pad_id)
        pt = t_prompt.shape[1]
    c = bucket_length(max(1, max(len(c) for c in completions)), completion_buckets)
    comp, comp_mask = pad_rows(completions, c, pad_value=pad_id, side="right")
    if sampler_logprobs is None:
        lp = np.zeros((len(completions), c), np.float32)
    else:
        for i, row in enumerate(completions):
            if len(sampler_logprobs[i]) != len(row):
                raise ValueError(f"row {i}: {len(sampler_logprobs[i])} sampler log-probs for {len(row)} tokens")
        lp, _ = pad_rows(sampler_logprobs, c, pad_value=0.0, side="right", dtype=np.float32)
    if max_seq_len is not None:
        widest = max(ps, pt if teacher_prompts is not None else ps)
        if widest >= max_seq_len:
            raise ValueError(f"prompt width {widest} leaves no room for a completion within {max_seq_len} tokens")
        room = max_seq_len - widest
        comp, comp_mask, lp = comp[:, :room], comp_mask[:, :room], lp[:, :room]
    student_tokens = np.concatenate([s_prompt, comp], axis=1)
    student_mask = np.concatenate([s_prompt_mask, comp_mask], axis=1)
    if teacher_prompts is None:
        teacher_tokens, teacher_mask = student_tokens, student_mask
    else:
        teacher_tokens = np.concatenate([t_prompt, comp], axis=1)
        teacher_mask = np.concatenate([t_prompt_mask, comp_mask], axis=1)
    return StepBatch(student_tokens=student_tokens, student_mask=student_mask, teacher_tokens=teacher_tokens,
                     teacher_mask=teacher_mask, completion_mask=comp_mask, sampler_logprobs=lp)
