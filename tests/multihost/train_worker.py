"""A few SDFT train steps of a tiny model, as one process of a (possibly) multi-process run.

Spawned by tests/distributed_test.py with XLA_FLAGS fixing the number of fake CPU devices. Every
process reads only its own block of each global batch (through the data pipeline, with the block that
`data_shard` gives) and builds its rows; process 0 writes the per-step losses and the final student
and teacher weights (gathered from all processes) to OUT/result.npz, and the student is exported as
an HF directory OUT/export (a collective; only process 0 writes). With --checkpoint, the train state
and the data position are saved with the project's Orbax Checkpointer after the steps, restored onto
the same shardings, and one more step runs from the restored state and a fresh data iterator.
Before training, `global_batch` is checked on several meshes against the full batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from sdft_jax import distributed

# Meshes over 4 devices whose batch axes split the rows differently over 2 processes of 2 devices:
# one block per process, two blocks per process, and one block shared by both (batch not sharded).
CHECK_MESHES = ({"fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": 2}, {"tensor": 4})


def parse_mesh(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def row(item: int, vocab: int = 300):
    """Student prompt, teacher prompt, completion and sampler log-probs of one data item."""
    rng = np.random.default_rng(1000 + item)
    student = list(rng.integers(3, vocab, rng.integers(3, 9)))
    teacher = list(rng.integers(3, vocab, rng.integers(8, 15)))
    completion = list(rng.integers(3, vocab, rng.integers(5, 12)))
    return student, teacher, completion, list(-rng.random(len(completion)))


def step_batch(items):
    from sdft_jax.distill.batch import make_step_batch

    student, teacher, completions, logprobs = zip(*(row(i) for i in items))
    # Fixed buckets: every process must build the same widths from its own rows.
    return make_step_batch(student, teacher, completions, pad_id=0, sampler_logprobs=logprobs,
                           prompt_buckets=(16,), completion_buckets=(16,))


def check_global_batches(rows: int) -> None:
    """`global_batch` from this process's rows equals the whole batch, on every mesh in CHECK_MESHES."""
    from sdft_jax.models.sharding import make_mesh

    if jax.device_count() != 4:
        return
    full = step_batch(range(rows))
    for shape in CHECK_MESHES:
        mesh = make_mesh(shape)
        local = jax.tree.map(lambda x, m=mesh: x[distributed.data_shard(m).rows(rows)], full)
        got = distributed.to_host(distributed.global_batch(local, mesh))
        for name, want, have in zip(("student_tokens", "student_mask", "teacher_tokens", "teacher_mask",
                                     "completion_mask", "sampler_logprobs"), jax.tree.leaves(full),
                                    jax.tree.leaves(got)):
            if not np.array_equal(want, have):
                raise AssertionError(f"global_batch on mesh {shape}: {name} differs from the full batch")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mesh", required=True, help="e.g. fsdp=2,tensor=2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=8, help="rows of each global batch")
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--timeout", type=int, default=60)
    parser.add_argument("--checkpoint", action="store_true")
    args = parser.parse_args(argv)

    distributed.maybe_initialize(distributed.DistributedConfig(
        coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
        initialization_timeout_s=args.timeout, cluster_detection="never"))

    from sdft_jax.checkpoints.hf import load_hf, save_hf
    from sdft_jax.data.pipeline import BatchIterator, PipelineConfig
    from sdft_jax.distill import teacher as teacher_lib
    from sdft_jax.distill.losses import LossConfig
    from sdft_jax.distill.train_state import OptimConfig, init_train_state, student_model
    from sdft_jax.distill.train_step import StepConfig, make_train_step
    from sdft_jax.models.sharding import make_mesh

    check_global_batches(args.rows)

    mesh = make_mesh(parse_mesh(args.mesh))
    cfg = StepConfig(
        loss=LossConfig(name="topk", top_k=8, chunk_size=16),
        teacher=teacher_lib.TeacherConfig(mode="ema", ema_alpha=0.1),
        optim=OptimConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0),
        total_steps=10,
    )
    model = load_hf(args.model, mesh=mesh)
    graphdef, state = init_train_state(model, cfg.optim)
    step_fn = make_train_step(graphdef, state, cfg, mesh=mesh)

    shard = distributed.data_shard(mesh)
    data = BatchIterator(list(range(64)), PipelineConfig(global_batch_size=args.rows, seed=0, num_epochs=None),
                         process_index=shard.index, process_count=shard.count)

    def run_step(state):
        return step_fn(state, distributed.global_batch(step_batch(next(data)), mesh))

    losses = []
    for _ in range(args.steps):
        state, metrics = run_step(state)
        losses.append(float(metrics["loss"]))

    if args.checkpoint:
        # Every process writes its shards (asynchronously); a fresh iterator resumes from the saved position.
        from sdft_jax.checkpointing import Checkpointer

        checkpointer = Checkpointer(os.path.join(args.out, "run"), keep=1, async_save=True)
        checkpointer.save(args.steps, state, data.get_state())
        checkpointer.wait()
        state, data_state = checkpointer.restore(checkpointer.latest_step(), state)
        checkpointer.close()
        data = BatchIterator(list(range(64)), data.config, process_index=shard.index, process_count=shard.count)
        data.set_state(data_state)
        state, metrics = run_step(state)
        losses.append(float(metrics["loss"]))

    host = distributed.to_host({"student": state.params, "teacher": state.teacher})
    save_hf(student_model(graphdef, state), os.path.join(args.out, "export"))
    if distributed.is_primary():
        flat = {jax.tree_util.keystr(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]}
        np.savez(os.path.join(args.out, "result.npz"), losses=np.asarray(losses, np.float64),
                 process_count=jax.process_count(), device_count=jax.device_count(), **flat)
    if jax.process_count() > 1:  # leave together: a process exiting early breaks the others' last collectives
        multihost_utils.sync_global_devices("train_worker_done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
