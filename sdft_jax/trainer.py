"""The training loop: the only place that knows the order of the parts.

    data -> rollout with the current student -> train step (teacher scoring, loss, update, teacher
    update; one jitted function) -> metrics -> periodic evaluation -> checkpoint
and, at the end, the final student exported as an HF directory plus an evaluation summary.

A run directory (local or `gs://`) holds `config.json`, `metrics.jsonl`, `tensorboard/`, `checkpoints/`,
`eval/`, `export/` and `summary.json`. Started again on the same directory, a run resumes from its latest
complete checkpoint (state and data position) and continues exactly as if never stopped; a finished
run returns its summary without training. Every file is written whole or not at all (`storage`,
`metrics`), and what a killed write left is removed at the next start.

A step whose loss or gradient is not finite skips its update (counted: `skipped_nonfinite` in its metric
row, `nonfinite_steps` in the summary). More consecutive such steps than `train.max_nonfinite_steps`, or
a state with non-finite values at a checkpoint, stop the run with `DivergedError`: nothing diverged is
checkpointed or exported, and no summary is written (the run is not finished).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from sdft_jax import distributed, storage
from sdft_jax.checkpointing import CheckpointError, Checkpointer, NonFiniteStateError
from sdft_jax.checkpoints.hf import load_hf, save_hf
from sdft_jax.checkpoints.registry import resolve_model
from sdft_jax.config import ConfigError, TrainConfig, check_fit, load_train_config, to_dict
from sdft_jax.data import offline_tasks, tasks
from sdft_jax.data.pipeline import BatchIterator, PipelineConfig
from sdft_jax.data.stream import StreamBatchIterator, StreamConfig
from sdft_jax.data.prompts import end_of_turn_id, prompt_item, render_prompts, render_sft, sft_item
from sdft_jax.data.records import DataError, ReadResult, Record, Skip
from sdft_jax.distill.batch import make_step_batch
from sdft_jax.distill.train_state import (TrainState, init_train_state, student_model, with_base_teacher,
                                          with_params, with_teacher)
from sdft_jax.distill.train_step import StepConfig, make_train_step, shard_batch
from sdft_jax.errors import ModelError
from sdft_jax.eval.runner import evaluate_tasks
from sdft_jax.metrics import MetricsWriter, truncate_metrics
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.sharding import make_mesh
from sdft_jax.models.transformer import Transformer
from sdft_jax.sampling.continuous import ContinuousSampler
from sdft_jax.sampling.sampler import DEFAULT_PROMPT_BUCKETS, Sampler
from sdft_jax.tokenization import load_tokenizer, pad_token_id, stop_token_ids

log = logging.getLogger(__name__)

# A streamed split's bad rows among its Skips (the others are dropped items).
_ROW = "row:"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DivergedError(RuntimeError):
    """The run diverged (see the module docstring): stopped with its last good checkpoint kept, nothing
    exported. `step` is the step it stopped at, `nonfinite_steps` the skipped steps up to it."""

    def __init__(self, message: str, *, step: int, nonfinite_steps: int):
        super().__init__(message)
        self.step = step
        self.nonfinite_steps = nonfinite_steps


def _offline_config(cfg: TrainConfig) -> offline_tasks.OfflineTaskConfig:
    return offline_tasks.OfflineTaskConfig(seed=cfg.data.offline_seed, num_train=cfg.data.offline_num_train)


def _read_options(cfg: TrainConfig) -> dict[str, Any]:
    return dict(data_dir=cfg.data.data_dir, offline=_offline_config(cfg), skip_bad_rows=cfg.data.skip_bad_rows,
                thinking_format=cfg.data.thinking_format, purpose="sft" if cfg.method == "sft" else "sdft",
                keep_system=cfg.data.keep_system, columns=cfg.data.columns, streaming=cfg.data.streaming,
                eval_split=cfg.data.eval_split)


def read_records(cfg: TrainConfig, task: str, split: str) -> ReadResult:
    """Records of `task` as the run's config reads or generates them, with the bad rows skipped."""
    return tasks.load_task(task, split, **_read_options(cfg))


def load_records(cfg: TrainConfig, task: str, split: str) -> list[Record]:
    """Records of `task` as the run's config reads or generates them."""
    return list(read_records(cfg, task, split).records)


class Trainer:
    """Builds every part from a TrainConfig; `run()` trains (or resumes) and returns the summary."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        distributed.maybe_initialize(cfg.distributed, fingerprint=config_fingerprint(cfg))
        self.primary = distributed.is_primary()
        self.run_dir = cfg.run_dir
        self.model_path = preflight(cfg)  # the rules that need config.json and the devices, before any weight
        self.mesh = make_mesh(cfg.mesh.shape())
        # This process's block of every global batch (index 0 of 1 with one process).
        self.shard = distributed.data_shard(self.mesh)
        self.tokenizer = load_tokenizer(self.model_path)
        self.pad_id = pad_token_id(self.tokenizer)
        self.sampler = Sampler(stop_ids=stop_token_ids(self.tokenizer), pad_id=self.pad_id, mesh=self.mesh,
                               weights=cfg.rollout.weights())
        # rollout.mode "continuous": the rollouts (not evaluation's greedy calls) refill a pool of decode slots.
        self.continuous = None if cfg.rollout.mode == "static" else ContinuousSampler(
            stop_ids=self.sampler.stop_ids, pad_id=self.pad_id, slots=cfg.rollout.decode_slots(), mesh=self.mesh,
            weights=cfg.rollout.weights())

        # Data: rendered prompt items, iterated in a seeded, resumable order: held whole and indexed, or
        # (data.streaming) rendered as the split is read.
        self._skipped_rows: dict[str, dict[str, int]] = {}  # bad rows by "task/split" (the `skipped_rows` property)
        self._held_dropped: dict[str, int] | None = None  # held items: dropped by reason (streamed: None)
        if cfg.data.streaming:
            self._stream_items(cfg)
        else:
            self._hold_items(cfg)
        cfg = self.cfg  # with train.epochs, the step count now follows from the data

        # Model and train state.
        model = load_hf(self.model_path, mesh=self.mesh, dtype=DTYPES[cfg.model.dtype],
                        param_dtype=DTYPES[cfg.model.param_dtype], lora=cfg.model.lora.adapters(),
                        remat=cfg.model.remat, query_block=cfg.model.query_block, attention=cfg.model.attention,
                        seed=cfg.seed)
        self.max_seq_len = model.cfg.max_position_embeddings
        self.step_cfg = StepConfig(loss=cfg.loss, teacher=cfg.teacher, optim=cfg.optim, total_steps=cfg.train.steps,
                                   skip_nonfinite=True, micro_batch_size=cfg.train.micro_batch_size)
        self.graphdef, self.state = init_train_state(model, self.step_cfg.optim, seed=cfg.seed,
                                                     train_router=cfg.model.train_router)
        del model
        if cfg.init_adapters_from:  # continue a previous LoRA run's adapters, with a fresh optimizer
            self.state = with_params(self.state, _last_params(cfg.init_adapters_from, self.state))
        if cfg.teacher.source == "base":  # the base model alone: adapters off
            self.state = with_base_teacher(self.state)
        if cfg.teacher_init_from:
            teacher = load_hf(resolve_model(cfg.teacher_init_from), mesh=self.mesh, dtype=DTYPES[cfg.model.dtype],
                              param_dtype=DTYPES[cfg.model.param_dtype], remat=cfg.model.remat,
                              query_block=cfg.model.query_block, attention=cfg.model.attention)
            self.state = with_teacher(self.state, teacher)
            del teacher
        self.train_step = make_train_step(self.graphdef, self.state, self.step_cfg, mesh=self.mesh)
        self.sampling = cfg.rollout.sampling()
        self.checkpointer = Checkpointer(self.run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
        self.eval_records = {}
        for t in cfg.eval.task_list():
            read = read_records(cfg, t, "eval")
            self.eval_records[t] = list(read.records)
            if read.num_skipped:
                self._skipped_rows[f"{t}/eval"] = dict(read.skipped)

    # -- one step --------------------------------------------------------------------------------

    def _hold_items(self, cfg: TrainConfig) -> None:
        """Every item rendered up front; the pipeline yields this process's indices (`_global_items`)."""
        read = read_records(cfg, cfg.data.task, cfg.data.split)
        records = list(read.records)
        if read.num_skipped:
            self._skipped_rows[f"{cfg.data.task}/{cfg.data.split}"] = dict(read.skipped)
        render = render_sft if cfg.method == "sft" else render_prompts
        rendered = render(self.tokenizer, records, cfg.prompts)
        self._held_dropped = dict(rendered.dropped)
        self.items = rendered.items
        self.num_items = len(self.items)
        if not self.items:
            raise self._no_items(len(records))
        # With train.epochs the step count follows from the data; every later use reads cfg.train.steps.
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, steps=cfg.train.steps_for(len(self.items))))
        self.iterator = BatchIterator(range(len(self.items)), PipelineConfig(
            global_batch_size=cfg.train.prompts_per_step, seed=cfg.seed, num_epochs=None),
            process_index=self.shard.index, process_count=self.shard.count)
        self._next_items = lambda: self._global_items(next(self.iterator))

    def _stream_items(self, cfg: TrainConfig) -> None:
        """data.streaming: items rendered as the split is read, pass after pass (`StreamBatchIterator`);
        every process reads the same stream and gets the whole global batch. The bad rows and dropped
        items are counted in the iterator's state: over every pass read, a resumed run as an uninterrupted one."""
        records = tasks.open_task(cfg.data.task, cfg.data.split, **_read_options(cfg))
        eot = end_of_turn_id(self.tokenizer) if cfg.method == "sft" else None
        self.items, self.num_items = None, None

        def open_items():
            seen, kept = 0, 0
            for record in records.open():
                if isinstance(record, Skip):  # a bad row, under data.skip_bad_rows
                    yield Skip(_ROW + record.reason)
                    continue
                seen += 1
                item = (sft_item(self.tokenizer, record, cfg.prompts, end_of_turn=eot) if eot is not None
                        else prompt_item(self.tokenizer, record, cfg.prompts))
                if isinstance(item, str):  # dropped: overlong, or no demonstration
                    yield Skip(item)
                    continue
                kept += 1
                yield item
            if not kept:
                raise self._no_items(seen)

        self.iterator = StreamBatchIterator(open_items, StreamConfig(
            global_batch_size=cfg.train.prompts_per_step, seed=cfg.seed, shuffle_window=cfg.data.shuffle_window))
        self._next_items = lambda: next(self.iterator)

    def _no_items(self, records: int) -> DataError:
        data = self.cfg.data
        return DataError(f"task {data.task!r} split {data.split!r}",
                         f"no training items: {records} records, dropped {self.dropped or 'none'} (an overlong "
                         "prompt is dropped: see config.prompts.max_prompt_tokens and overlong)")

    @property
    def dropped(self) -> dict[str, int]:
        """Items dropped while rendering (overlong, no demonstration), by reason."""
        if self._held_dropped is not None:
            return self._held_dropped
        return {k: v for k, v in self.iterator.skipped.items() if not k.startswith(_ROW)}

    @property
    def skipped_rows(self) -> dict[str, dict[str, int]]:
        """Bad rows skipped under data.skip_bad_rows, by "task/split" and reason (the eval splits' too)."""
        rows = dict(self._skipped_rows)
        if self._held_dropped is None:
            train = {k[len(_ROW):]: v for k, v in self.iterator.skipped.items() if k.startswith(_ROW)}
            if train:
                rows[f"{self.cfg.data.task}/{self.cfg.data.split}"] = train
        return rows

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
        # Once per step: the student's weights cast to rollout.dtype and laid out for sampling (dropped after).
        weights = self.sampler.rollout_weights(student_model(self.graphdef, self.state))
        sampler = self.sampler if self.continuous is None else self.continuous
        out = sampler.generate(weights, students, self.sampling, key)
        del weights
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
        summaries = evaluate_tasks(student_model(self.graphdef, self.state), self.tokenizer, self.sampler,
                                   self.eval_records, limit=cfg.limit, max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, prompt_config=self.cfg.prompts, scoring=cfg.scoring,
                                   out_dir=out_dir)
        # Evaluation's KV cache (its own batch and length) and rollout weights serve no rollout: freed
        # before the checkpoint save and the train step that may follow.
        self.sampler.clear_cache()
        return summaries

    # -- the run ---------------------------------------------------------------------------------

    def _resume(self) -> int:
        # The run's counters of non-finite steps: in every checkpoint, so a resumed run stops where it would have.
        self.nonfinite_steps, self.consecutive_nonfinite = 0, 0
        restored = self.checkpointer.restore_latest(self.state)  # the newest intact one (damaged: warned)
        if restored is None:
            return 0
        self.state = restored.state
        self.iterator.set_state(restored.data)
        self.nonfinite_steps = restored.run.get("nonfinite_steps", 0)
        self.consecutive_nonfinite = restored.run.get("consecutive_nonfinite", 0)
        log.info("resumed from %s at step %d", self.checkpointer.directory, restored.step)
        return restored.step

    def _diverged(self, step: int, reason: str, writer: MetricsWriter) -> DivergedError:
        """Flushes what the run wrote and returns the error to raise (the last good checkpoint stays)."""
        self.checkpointer.wait()
        writer.close()
        message = (f"the run diverged at step {step}: {reason}; {self.nonfinite_steps} of {step} steps skipped "
                   f"as non-finite; stopped with the last good checkpoint (step {self.checkpointer.latest_step()}) "
                   "kept and nothing exported")
        log.error(message)
        return DivergedError(message, step=step, nonfinite_steps=self.nonfinite_steps)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        summary_path = os.path.join(self.run_dir, "summary.json")
        start = self._resume()
        if start >= cfg.train.steps and storage.exists(summary_path):
            try:
                return storage.read_json(summary_path)
            except ValueError as e:  # not written by this version (its writes are atomic): finish again
                log.warning("%s is unreadable (%s); finishing the run again", summary_path, e)
        if self.primary:
            storage.makedirs(self.run_dir)
            for path in storage.remove_partials(self.run_dir):
                log.info("removed %s, left by an interrupted write", path)
            storage.write_json(os.path.join(self.run_dir, "config.json"), to_dict(cfg))
            # Rows the resumed run writes again: those after its checkpoint, and the evaluation-only rows at
            # it (the evaluation at the start of a run, the final one).
            truncate_metrics(self.run_dir, keep=lambda r: r["step"] < start or (r["step"] == start and "loss" in r))
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
            items = self._next_items()
            batch, stats = self._sft_batch(items) if cfg.method == "sft" else self._rollout_batch(items, step)
            t1 = time.perf_counter()
            self.sampler.clear_cache()  # the KV cache and the rollout weights, freed before the train step
            self.state, metrics = self.train_step(self.state, self._local_rows(batch))
            metrics = {k: np.asarray(v).item() for k, v in distributed.to_host(metrics).items()}
            t2 = time.perf_counter()
            self.nonfinite_steps += int(metrics["skipped_nonfinite"])
            self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if metrics["skipped_nonfinite"] else 0
            diverged = self.consecutive_nonfinite > cfg.train.max_nonfinite_steps
            done = step + 1
            row = {**metrics, **stats, "epoch": self.iterator.epoch, "time/rollout_s": t1 - t0,
                   "time/step_s": t2 - t1,
                   "tokens_per_s": metrics["completion_tokens"] / max(t2 - t0, 1e-9),
                   "sampler/compilations": self.sampler.compilations + (
                       self.continuous.compilations if self.continuous is not None else 0)}
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.steps and self.eval_records:
                t = time.perf_counter()
                evals = self._evaluate(done)
                row.update(_flatten_eval(evals), **{"time/eval_s": time.perf_counter() - t})
            if done % cfg.train.log_every == 0 or done == cfg.train.steps or diverged:
                writer.write(done, row)
            if diverged:
                raise self._diverged(done, f"{self.consecutive_nonfinite} consecutive steps with a non-finite loss "
                                           f"or gradient (train.max_nonfinite_steps = {cfg.train.max_nonfinite_steps})",
                                     writer)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", len=f"{stats.get('rollout/mean_length', 0):.0f}")
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps:
                run_state = {"nonfinite_steps": self.nonfinite_steps,
                             "consecutive_nonfinite": self.consecutive_nonfinite}
                try:  # refused for a state with a non-finite value: the final one, exported, is always saved
                    self.checkpointer.save(done, self.state, self.iterator.get_state(), run_state)
                except NonFiniteStateError as e:
                    raise self._diverged(done, str(e), writer) from None
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
                   "skipped_rows": self.skipped_rows,
                   "train_items": self.num_items, "nonfinite_steps": self.nonfinite_steps}
        writer.flush()  # the summary is written last: a run with one is complete
        if self.primary:
            storage.write_json(os.path.join(self.run_dir, "summary.json"), summary)
        return summary


def _model_key(cfg: TrainConfig) -> tuple[str, str]:
    """The student's model (`init_from`, else `model.name`) and the config key that names it."""
    return (cfg.init_from, "init_from") if cfg.init_from else (cfg.model.name, "model.name")


def model_config_of(name_or_path: str, key: str) -> tuple[str, ModelConfig]:
    """The local directory of model `name_or_path` (config key `key`) and its config.json's architecture,
    read without the weights; ModelError naming the key if it is no usable model directory."""
    try:
        path = resolve_model(name_or_path)
        return path, ModelConfig.from_hf(path)
    except (OSError, ValueError) as e:
        named = f"config.{key}" if name_or_path in str(e) else f"config.{key} = {name_or_path!r}"
        raise ModelError(f"{named}: {e}") from None


# ModelConfig fields the teacher's weights must share with the student's (the two trees have one shape).
_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "moe", "dense_layers", "deltanet", "linear_layers")


def preflight(cfg: TrainConfig) -> str:
    """Checks what the config alone cannot show, before any weight is loaded, and returns the student's
    model directory: the rules of `config.check_fit` (mesh and devices, `loss.top_k` and the vocabulary,
    ...), a `teacher_init_from` of the student's shape, an `init_adapters_from` run with checkpoints.
    Call after `distributed.maybe_initialize` (it counts the devices)."""
    name, key = _model_key(cfg)
    path, model = model_config_of(name, key)
    check_fit(cfg, model, jax.device_count())
    if cfg.teacher_init_from:
        _, teacher = model_config_of(cfg.teacher_init_from, "teacher_init_from")
        differ = [f for f in _SHAPE_FIELDS if getattr(teacher, f) != getattr(model, f)]
        if differ:
            raise ConfigError(f"config.teacher_init_from = {cfg.teacher_init_from!r}: not the student's architecture "
                              f"({', '.join(f'{f} {getattr(teacher, f)} vs {getattr(model, f)}' for f in differ)})")
    if cfg.init_adapters_from and not storage.exists(os.path.join(cfg.init_adapters_from, "checkpoints")):
        raise ConfigError(f"config.init_adapters_from = {cfg.init_adapters_from!r}: no checkpoints/ there (not a run "
                          "directory, or its run saved no checkpoint)")
    return path


def check_plan_fits(base: TrainConfig, configs: list[TrainConfig]) -> None:
    """`config.check_fit` of every stage config of a continual plan against its base model, before that model
    loads (a later stage starts from an earlier one's export, of the same architecture); errors name
    `config.train.<key>`."""
    distributed.maybe_initialize(base.distributed, fingerprint=config_fingerprint(base))
    name, key = _model_key(base)
    _, model = model_config_of(name, f"train.{key}")
    for cfg in configs:
        check_fit(cfg, model, jax.device_count(), prefix="config.train")


def _last_params(run_dir: str, like: TrainState):
    """The trainable parameters of the last checkpoint of the run in `run_dir`, onto `like`'s shardings
    (`preflight` has checked that it has checkpoints/)."""
    source = Checkpointer(run_dir, async_save=False)
    try:
        step = source.latest_step()
        if step is None:
            raise ConfigError(f"config.init_adapters_from = {run_dir!r}: its checkpoints/ holds no checkpoint")
        try:
            state, _ = source.restore(step, like)
        except ValueError as e:
            raise ConfigError(f"config.init_adapters_from = {run_dir!r}: its step-{step} checkpoint does not fit this "
                              f"run (model, model.lora rank and targets must be that run's): {e}") from None
    finally:
        source.close()
    log.info("adapters from %s, step %d", run_dir, step)
    return state.params


RunWeights = Literal["checkpoint", "export", "base"]


@dataclasses.dataclass(frozen=True)
class RunModel:
    """A run's model loaded for evaluation, with the run's own config (prompts, data settings, dtypes)."""

    model: Transformer
    config: TrainConfig
    mesh: jax.sharding.Mesh  # the run's mesh shape on this process's devices; the model lives on it
    path: str  # the model directory its tokenizer is read from
    step: int | None  # the checkpoint's step; None for the export or the base model


def load_run_model(run_dir: str, weights: RunWeights = "checkpoint") -> RunModel:
    """The model of the run in `run_dir` (its `config.json` says how it was built).

    `weights`: "checkpoint", the student at the run's latest checkpoint (LoRA adapters on the unchanged
    base, or every trained weight); "export", its exported HF directory; "base", the model it started
    from (`init_from`, else `model.name`). Nothing in `run_dir` is changed (a damaged newest checkpoint is
    an error here, not set aside). CheckpointError naming the directory when it is no run directory or
    holds no such weights.
    """
    config_path = os.path.join(run_dir, "config.json")
    if not storage.exists(config_path):
        raise CheckpointError(f"{run_dir}: not a run directory (no config.json)")
    try:
        cfg = load_train_config(storage.read_json(config_path))
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    name, key = _model_key(cfg)
    base_path, _ = model_config_of(name, key)
    dtypes = {"dtype": DTYPES[cfg.model.dtype], "param_dtype": DTYPES[cfg.model.param_dtype]}
    mesh = make_mesh(cfg.mesh.shape())
    if weights == "base":
        model = load_hf(base_path, mesh=mesh, **dtypes)
        return RunModel(model=model, config=cfg, mesh=mesh, path=base_path, step=None)
    if weights == "export":
        export = os.path.join(run_dir, "export")
        if not storage.exists(os.path.join(export, "config.json")):  # the export's last file
            raise CheckpointError(f"{run_dir}: no complete export/ (the run has not finished)")
        path, _ = model_config_of(export, "export")
        return RunModel(model=load_hf(path, mesh=mesh, **dtypes), config=cfg, mesh=mesh, path=path, step=None)
    if weights != "checkpoint":
        raise ValueError(f"unknown weights {weights!r}; expected checkpoint, export or base")
    if not storage.exists(os.path.join(run_dir, "checkpoints")):
        raise CheckpointError(f"{run_dir}: no checkpoints/ (the run saved no checkpoint)")
    model = load_hf(base_path, mesh=mesh, lora=cfg.model.lora.adapters(), seed=cfg.seed, **dtypes)
    graphdef, state = init_train_state(model, cfg.optim, seed=cfg.seed, train_router=cfg.model.train_router)
    del model
    source = Checkpointer(run_dir, async_save=False)  # (of a run no longer writing: it tidies unfinished saves)
    try:
        step = source.latest_step()
        if step is None:
            raise CheckpointError(f"{run_dir}: no checkpoint in checkpoints/")
        try:
            state, _ = source.restore(step, state)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{run_dir}: its step-{step} checkpoint does not restore: {e}") from None
    finally:
        source.close()
    return RunModel(model=student_model(graphdef, state), config=cfg, mesh=mesh, path=base_path, step=step)


def config_fingerprint(cfg: TrainConfig) -> str:
    """Equal on every process started with the same config (the distributed section, which holds each
    process's own id, left out): the rendezvous refuses a host started with a different config."""
    resolved = to_dict(cfg)
    resolved.pop("distributed")
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    return f"{distributed.default_fingerprint()} config={digest}"


def _flatten_eval(evals: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{task}/accuracy": s["accuracy"] for task, s in evals.items()}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes, or returns the summary of) the run described by `cfg`."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.checkpointer.close()
