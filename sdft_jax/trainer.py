"""The training loop: the only place that knows the order of the parts.

    data -> rollout with the current student -> train step (teacher scoring, loss, update, teacher
    update; one jitted function) -> metrics -> periodic evaluation -> checkpoint
and, at the end, the final student exported as an HF directory plus an evaluation summary.

A run directory (local or `gs://`) holds `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`,
`eval/`, `export/` and `summary.json`. Started again on the same directory, a run resumes from its latest
complete checkpoint (state and data position) and continues exactly as if never stopped; a finished
run returns its summary without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sdft_jax import distributed, storage
from sdft_jax.checkpointing import Checkpointer
from sdft_jax.checkpoints.hf import load_hf, save_hf
from sdft_jax.checkpoints.registry import resolve_model
from sdft_jax.config import TrainConfig, to_dict
from sdft_jax.data import offline_tasks, tasks
from sdft_jax.data.pipeline import BatchIterator, PipelineConfig
from sdft_jax.data.prompts import render_prompts, render_sft
from sdft_jax.distill.batch import make_step_batch
from sdft_jax.distill.train_state import init_train_state, student_model, with_teacher
from sdft_jax.distill.train_step import StepConfig, make_train_step, shard_batch
from sdft_jax.eval.runner import evaluate_tasks
from sdft_jax.metrics import MetricsWriter, read_metrics
from sdft_jax.models.sharding import make_mesh
from sdft_jax.sampling.sampler import DEFAULT_PROMPT_BUCKETS, Sampler
from sdft_jax.tokenization import load_tokenizer, pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Raised with `train.nonfinite = "stop"`; the last good checkpoint is left as it was."""


def _offline_config(cfg: TrainConfig) -> offline_tasks.OfflineTaskConfig:
    return offline_tasks.OfflineTaskConfig(seed=cfg.data.offline_seed, num_train=cfg.data.offline_num_train)


def load_records(cfg: TrainConfig, task: str, split: str):
    """Records of `task` as the run's config reads or generates them."""
    return tasks.load_records(
        task, split, data_dir=cfg.data.data_dir, offline=_offline_config(cfg), skip_bad_rows=cfg.data.skip_bad_rows,
        thinking_format=cfg.data.thinking_format, purpose="sft" if cfg.method == "sft" else "sdft",
        keep_system=cfg.data.keep_system)


class Trainer:
    """Builds every part from a TrainConfig; `run()` trains (or resumes) and returns the summary."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        distributed.maybe_initialize(cfg.distributed, fingerprint=config_fingerprint(cfg))
        self.primary = distributed.is_primary()
        self.run_dir = cfg.run_dir
        self.mesh = make_mesh(cfg.mesh.shape())
        # This process's block of every global batch (index 0 of 1 with one process).
        self.shard = distributed.data_shard(self.mesh)
        self.model_path = resolve_model(cfg.init_from or cfg.model.name)
        self.tokenizer = load_tokenizer(self.model_path)
        self.pad_id = pad_token_id(self.tokenizer)
        self.sampler = Sampler(stop_ids=stop_token_ids(self.tokenizer), pad_id=self.pad_id, mesh=self.mesh)

        # Data: rendered prompt items, iterated in a seeded, resumable order.
        records = load_records(cfg, cfg.data.task, cfg.data.split)
        render = render_sft if cfg.method == "sft" else render_prompts
        rendered = render(self.tokenizer, records, cfg.prompts)
        self.dropped = dict(rendered.dropped)
        self.items = rendered.items
        # The pipeline yields this process's item indices; _global_items gathers the whole batch.
        self.iterator = BatchIterator(range(len(self.items)), PipelineConfig(
            global_batch_size=cfg.train.prompts_per_step, seed=cfg.seed, num_epochs=None),
            process_index=self.shard.index, process_count=self.shard.count)

        # Model and train state.
        model = load_hf(self.model_path, mesh=self.mesh, dtype=DTYPES[cfg.model.dtype],
                        param_dtype=DTYPES[cfg.model.param_dtype], lora=cfg.model.lora.adapters(),
                        remat=cfg.model.remat, query_block=cfg.model.query_block, seed=cfg.seed)
        self.max_seq_len = model.cfg.max_position_embeddings
        self.step_cfg = StepConfig(loss=cfg.loss, teacher=cfg.teacher, optim=cfg.optim, total_steps=cfg.train.steps,
                                   skip_nonfinite=True)
        self.graphdef, self.state = init_train_state(model, self.step_cfg.optim, seed=cfg.seed,
                                                     train_router=cfg.model.train_router)
        del model
        if cfg.teacher_init_from:
            teacher = load_hf(resolve_model(cfg.teacher_init_from), mesh=self.mesh, dtype=DTYPES[cfg.model.dtype],
                              param_dtype=DTYPES[cfg.model.param_dtype], remat=cfg.model.remat,
                              query_block=cfg.model.query_block)
            self.state = with_teacher(self.state, teacher)
            del teacher
        self.train_step = make_train_step(self.graphdef, self.state, self.step_cfg, mesh=self.mesh)
        self.sampling = cfg.rollout.sampling()
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self.eval_records = {t: load_records(cfg, t, "eval") for t in cfg.eval.task_list()}

    # -- one step --------------------------------------------------------------------------------

    def _global_items(self, local: list[int]) -> list:
        """The items of the whole global batch, in order, from this process's block of indices.

        Rollouts sample the global batch on the whole mesh (every process passes the same prompts),
        and padded widths are then chosen from all rows, so every process builds the same shapes.
        """
        if self.shard.count == 1:
            return [self.items[i] for i in local]
        blocks = np.asarray(multihost_utils.process_allgather(np.asarray([self.shard.index, *local], np.int64)))
        by_block = {int(b[0]): [int(i) for i in b[1:]] for b in blocks}  # processes sharing a block agree
        return [self.items[i] for block in range(self.shard.count) for i in by_block[block]]

    def _local_rows(self, batch):
        """This process's rows of a global StepBatch, placed on the mesh as one global batch."""
        rows = self.shard.rows(batch.student_tokens.shape[0])
        return shard_batch(jax.tree.map(lambda x: x[rows], batch), self.mesh)

    def _rollout_batch(self, items, step: int):
        """Samples completions with the current student; returns the StepBatch and rollout metrics."""
        n = self.cfg.rollout.samples_per_prompt
        students = [list(i.student_ids) for i in items for _ in range(n)]
        teachers = [list(i.teacher_ids) for i in items for _ in range(n)]
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
        out = self.sampler.generate(student_model(self.graphdef, self.state), students, self.sampling, key)
        completions = out.completions()
        logprobs = [row[:len(c)].tolist() for row, c in zip(out.model_logprobs, completions)]
        batch = make_step_batch(students, teachers, completions, pad_id=self.pad_id, sampler_logprobs=logprobs,
                                prompt_buckets=self.sampling.prompt_buckets,
                                completion_buckets=(self.sampling.max_new_tokens,), max_seq_len=self.max_seq_len)
        lengths = np.asarray(out.lengths)
        stats = {"rollout/mean_length": float(lengths.mean()), "rollout/max_length": int(lengths.max()),
                 "rollout/stop_token_frac": float(np.mean([r == "stop_token" for r in out.stop_reasons])),
                 "rollout/length_frac": float(np.mean([r == "length" for r in out.stop_reasons]))}
        return batch, stats

    def _sft_batch(self, items):
        batch = make_step_batch([list(i.prompt_ids) for i in items], None, [list(i.target_ids) for i in items],
                                pad_id=self.pad_id, prompt_buckets=DEFAULT_PROMPT_BUCKETS,
                                completion_buckets=DEFAULT_PROMPT_BUCKETS, max_seq_len=self.max_seq_len)
        return batch, {}

    def _evaluate(self, step: int) -> dict[str, Any]:
        cfg = self.cfg.eval
        out_dir = os.path.join(self.run_dir, "eval", f"step_{step:06d}") if self.primary else None
        return evaluate_tasks(student_model(self.graphdef, self.state), self.tokenizer, self.sampler,
                              self.eval_records, limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size, prompt_config=self.cfg.prompts, out_dir=out_dir)

    # -- the run ---------------------------------------------------------------------------------

    def _resume(self) -> int:
        latest = self.checkpointer.latest_step()
        if latest is None:
            return 0
        self.state, data_state = self.checkpointer.restore(latest, self.state)
        self.iterator.set_state(data_state)
        log.info("resumed from %s at step %d", self.checkpointer.directory, latest)
        return latest

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        summary_path = os.path.join(self.run_dir, "summary.json")
        start = self._resume()
        if start >= cfg.train.steps and storage.exists(summary_path):
            return storage.read_json(summary_path)
        if self.primary:
            storage.makedirs(self.run_dir)
            storage.write_json(os.path.join(self.run_dir, "config.json"), to_dict(cfg))
            _truncate_metrics(self.run_dir, start)
        writer = MetricsWriter(self.run_dir, enabled=self.primary)
        evals: dict[str, Any] = {}
        if start == 0 and cfg.eval.at_start and self.eval_records:
            t = time.perf_counter()
            evals = self._evaluate(0)
            writer.write(0, {**_flatten_eval(evals), "time/eval_s": time.perf_counter() - t})
        bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, disable=not self.primary,
                   desc=f"{cfg.method} {os.path.basename(self.run_dir.rstrip('/'))}", dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            items = self._global_items(next(self.iterator))
            batch, stats = self._sft_batch(items) if cfg.method == "sft" else self._rollout_batch(items, step)
            t1 = time.perf_counter()
            self.sampler.clear_cache()
            self.state, metrics = self.train_step(self.state, self._local_rows(batch))
            metrics = {k: np.asarray(v).item() for k, v in distributed.to_host(metrics).items()}
            t2 = time.perf_counter()
            if metrics["skipped_nonfinite"] and cfg.train.nonfinite == "stop":
                self.checkpointer.wait()
                raise NonFiniteLossError(f"step {step + 1}: non-finite loss or gradient; stopped with the last "
                                         f"good checkpoint (step {self.checkpointer.latest_step()}) intact")
            done = step + 1
            row = {**metrics, **stats, "epoch": self.iterator.epoch, "time/rollout_s": t1 - t0,
                   "time/step_s": t2 - t1,
                   "tokens_per_s": metrics["completion_tokens"] / max(t2 - t0, 1e-9),
                   "sampler/compilations": self.sampler.compilations}
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps and self.eval_records:
                t = time.perf_counter()
                evals = self._evaluate(done)
                row.update(_flatten_eval(evals), **{"time/eval_s": time.perf_counter() - t})
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                writer.write(done, row)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", len=f"{stats.get('rollout/mean_length', 0):.0f}")
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                self.checkpointer.save(done, self.state, self.iterator.get_state())
                writer.flush()  # a resume from this checkpoint finds the metric rows up to it
        bar.close()
        self.checkpointer.wait()
        summary = self._finish(writer)
        writer.close()
        return summary

    def _finish(self, writer: MetricsWriter) -> dict[str, Any]:
        cfg = self.cfg
        evals = self._evaluate(cfg.train.steps) if self.eval_records else {}
        if evals:
            writer.write(cfg.train.steps, _flatten_eval(evals))
        export_dir = os.path.join(self.run_dir, "export")
        # Agreed before anyone writes: the export is a collective, so every process must take part or none.
        # config.json is the export's last file: a remote export without it is incomplete and redone.
        exported = distributed.agree_max([int(storage.exists(os.path.join(export_dir, "config.json")))])[0]
        if cfg.export and not exported:
            # A drop-in replacement of the source: its config.json, layout (causal LM or multimodal), the
            # experts' layout, and the tensors training does not use (a vision tower) copied through.
            save_hf(student_model(self.graphdef, self.state), export_dir, tokenizer_dir=self.model_path,
                    source_dir=self.model_path)
        summary = {"method": cfg.method, "loss": cfg.loss.name, "steps": cfg.train.steps, "eval": evals,
                   "export": export_dir if cfg.export else None, "dropped_items": self.dropped,
                   "train_items": len(self.items)}
        writer.flush()  # the summary is written last: a run with one is complete
        if self.primary:
            storage.write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary


def config_fingerprint(cfg: TrainConfig) -> str:
    """Equal on every process started with the same config (the distributed section, which holds each
    process's own id, left out): the rendezvous refuses a host started with a different config."""
    resolved = to_dict(cfg)
    resolved.pop("distributed")
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    return f"{distributed.default_fingerprint()} config={digest}"


def _flatten_eval(evals: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{task}/accuracy": s["accuracy"] for task, s in evals.items()}


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Drops metric rows after `step` (written before a crash, redone after the resume)."""
    rows = [r for r in read_metrics(run_dir) if r["step"] <= step]
    path = os.path.join(run_dir, "metrics.jsonl")
    if storage.exists(path):
        storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes, or returns the summary of) the run described by `cfg`."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.checkpointer.close()
