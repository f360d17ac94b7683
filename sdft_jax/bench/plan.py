"""Scale checked before launch: does a trainer config fit the chips, and what does it communicate?

`python -m sdft_jax.bench plan --config=CONFIG[:VARIANT] --devices N --chip v5p|v6e|h100|h200 [--json]`
(exit status 0 when it fits, 3 when it does not, 1 for a bad config or model config)

In a fresh process with N fake CPU devices, the config's two device programs are lowered and compiled
ahead of time, with no weight loaded (the model is `nnx.eval_shape`d, every input a
`jax.ShapeDtypeStruct` carrying its sharding on the config's mesh):
- `train_step`: `distill.train_step.make_train_step` on the train state (`abstract_train_state`, laid out
  as the trainer lays it out: every parameter, Adam moment and teacher weight by its logical axes) and a
  step batch of the config's full shape (`train.prompts_per_step` x `rollout.samples_per_prompt` rows,
  prompts of `prompts.max_prompt_tokens` rounded up to their bucket, completions of
  `rollout.max_new_tokens`; `train.micro_batch_size` as set);
- `rollout`: the sampler's program (`sampling.sampler.sample`, prefill and decode loop, the stacked KV
  cache donated) for one sampler call of the largest batch the config samples, on the rollout weights
  as the chip's trainer makes them (`sampling.rollout_weights.StackedWeights`: cast to `rollout.dtype`,
  whose "auto" is bfloat16 on these accelerator chips, also the KV cache's dtype; laid out by the
  rollout sharding rules).

From `compiled.memory_analysis()` each program reports per-device argument, output, temporary and
aliased bytes (`per_device_bytes`), and its peak: arguments + outputs + temporaries - aliased (the
donated state is updated in place). The rollout runs while the train state stays on the devices, so its
peak adds the state less the weights the rollout weights share with it (none once cast). A program
`fits` when its peak is within the chip's HBM less a headroom (`--headroom`, default 15%: the runtime's
own buffers and fragmentation); the config fits when both do. The collectives come from the optimised
HLO (`compiled.as_text()`): per kind, the instructions in the program (`count`, `bytes` of their
results) and how often they run (`executed`, `executed_bytes`: an instruction in a loop of known trip
count, such as the layer scan, once per iteration; the decode loop's trip count is not known, so its
collectives count once: per decoded token). `matmul_flops` counts each program's matmuls by the dtypes
of their operands, from the program as traced (`matmul_flops.py`): an fp32 matmul in a bf16 config's
step runs at an accelerator's fp32 (TF32) rate. A fused kernel's matmuls (the splash attention that
`--compiler tpu` traces) are not in that count; `matmul_kernels_not_counted` says how many such calls.

The model's shapes come from its `config.json` without the weights: config.model.name when it is an HF
directory (or a registered name), else `--model-config FILE`, else `models/<basename of model.name>.json`
beside the config file (configs/models/ holds those of Qwen3-8B, Qwen3-30B-A3B and Qwen3.5-35B-A3B,
written from the architectures' published facts).

Which compiler (`--compiler`): `cpu` (the default) compiles for N fake CPU devices with XLA:CPU;
`tpu` compiles ahead of time with the TPU compiler itself for the chip's slice (`--topology`, by default
the standard slice shape of N chips, e.g. v5p:2x4x4 for 32), on a machine with no TPU: it needs the
`libtpu` package that `pip install 'sdft-jax[tpu]'` brings, and traces the TPU pieces (`ragged_dot`,
the splash attention kernel); `native` (or `--native`) compiles for the machine's own GPU or TPU
devices. Argument, output and aliased bytes are the same for every compiler (the inputs' shapes and
shardings decide them) but for a TPU's tiling (arrays laid out in tiles of 8 x 128 elements: small
dimensions pad); temporaries are not. XLA:CPU computes bf16 matmuls in fp32 and fuses less, and
platform-specific pieces take their CPU implementation (a MoE layer's tiled grouped matmul instead of
`ragged_dot`), so its temporaries are an over-estimate: for Qwen3-8B LoRA on one device, 2.3x the H200
compiler's for the train step (whose own figure was within 1% of the peak measured running it) and 23x
for the rollout (docs/benchmarks.md). For a TPU chip, `--compiler tpu` is the figure to trust.
`--peak-buffers K` adds, per program, the K largest buffer shapes live at its memory peak
(`peak_buffers.py`). The evaluation's sampler calls (`eval.batch_size`) are not planned.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from typing import Any

from sdft_jax.bench.harness import in_fresh_process
from sdft_jax.bench.hlo_collectives import collectives
from sdft_jax.bench.matmul_flops import matmul_flops
from sdft_jax.bench.peak_buffers import compile_with_peak_buffers

GIB = 1024**3
# HBM per chip (one JAX device), GiB.
CHIP_HBM_GIB: dict[str, float] = {"v5p": 95.0, "v6e": 32.0, "h100": 80.0, "h200": 141.0}
# The platform each chip is (what the rollout weights' "auto" settings resolve for).
CHIP_PLATFORM: dict[str, str] = {"v5p": "tpu", "v6e": "tpu", "h100": "gpu", "h200": "gpu"}
DEFAULT_HEADROOM = 0.15
COMPILERS = ("cpu", "tpu", "native")
# A TPU slice's chips per host (`--compiler tpu`'s topology): 2x2 for both generations.
TPU_HOST_BOUNDS: dict[str, tuple[int, int, int]] = {"v5p": (2, 2, 1), "v6e": (2, 2, 1)}
TPU_TOPOLOGY_RANK: dict[str, int] = {"v5p": 3, "v6e": 2}  # a 3-D torus, a 2-D one
TPU_CORES_PER_CHIP: dict[str, int] = {"v5p": 2, "v6e": 1}  # what accelerator type names count (v5p-64: 32 chips)


def tpu_topology(chip: str, devices: int) -> str:
    """The standard slice shape of `devices` chips of a TPU `chip` as libtpu names it ("v5p:2x4x4",
    "v6e:4x8"): from one host's 2x2 (1 or 2 chips: 1x1, 1x2), each doubling grows the last of the
    smallest dimensions (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v6e: 2x2, 2x4, 4x4, 4x8, ...)."""
    if chip not in TPU_TOPOLOGY_RANK:
        raise ValueError(f"--compiler tpu: --chip {chip} is not a TPU (TPU chips: {sorted(TPU_TOPOLOGY_RANK)})")
    if devices < 1 or devices & (devices - 1):
        raise ValueError(f"--compiler tpu: a {chip} slice of {devices} chips has no standard shape (a power of two); "
                         "pass --topology, e.g. v5p:2x2x3")
    rank = TPU_TOPOLOGY_RANK[chip]
    dims = [1] * rank
    if devices >= 4:
        dims[:2] = [2, 2]
    elif devices == 2:
        dims[1] = 2
    while math.prod(dims) < devices:
        smallest = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
    return f"{chip}:" + "x".join(map(str, dims))


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice `topology` ("v5p:2x4x4") for ahead-of-time compilation in this process,
    which has no TPU (`jax.experimental.topologies`; libtpu's compiler, no TPU runtime).

    libtpu reads its environment when it first loads, here: unless set already, it is told there is no TPU
    VM to query (this slice is described to it instead), and that other processes may load it beside
    this one (plans and tests side by side; otherwise it takes a lock)."""
    from jax.experimental import topologies

    chip, _, shape = topology.partition(":")
    dims = [int(d) for d in shape.split("x")] if re.fullmatch(r"\d+(x\d+){1,2}", shape) else None
    if chip not in TPU_HOST_BOUNDS or dims is None:
        raise ValueError(f"--topology {topology!r}: expected CHIP:AxB[xC] with CHIP one of {sorted(TPU_HOST_BOUNDS)}")
    host = tuple(min(h, d) for h, d in zip(TPU_HOST_BOUNDS[chip], dims + [1] * (3 - len(dims)), strict=True))
    no_tpu_vm = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                 "TPU_ACCELERATOR_TYPE": f"{chip}-{TPU_CORES_PER_CHIP[chip] * math.prod(dims)}"}
    for key, value in no_tpu_vm.items():
        os.environ.setdefault(key, value)
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=host, num_slices=1, wrap=(False, False, False))
    return list(desc.devices)


# -- the config and the model's shapes -------------------------------------------------------------


def load_config_file(spec: str, overrides: tuple[str, ...] = ()):
    """The TrainConfig of `FILE[:VARIANT]` (a configs/*.py file's `get_config(variant)`), with dotted
    `KEY=VALUE` overrides (e.g. `train.micro_batch_size=4`) applied before validation."""
    from sdft_jax.config import ConfigError, load_train_config

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no file {path!r}")
    module_spec = importlib.util.spec_from_file_location("_sdft_plan_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    raw = module.get_config(variant) if variant else module.get_config()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node = raw
        *parents, last = key.removeprefix("config.").split(".")
        for name in parents:
            if name not in node:
                raise ConfigError(f"--set {item!r}: unknown config key {key}")
            node = node[name]
        if last not in node:
            raise ConfigError(f"--set {item!r}: unknown config key {key}")
        try:
            node[last] = value
        except TypeError:  # ml_collections keeps a key's type (a tuple field is a comma-joined string)
            raise ConfigError(f"--set {item!r}: {key} takes a {type(node[last]).__name__}, not "
                              f"{type(value).__name__} {value!r}") from None
    return load_train_config(raw)


def model_config_path(cfg, config_file: str, explicit: str | None) -> str:
    """Where the model's config.json is read from (see the module docstring)."""
    from sdft_jax.checkpoints.registry import known_models, resolve_model

    if explicit:
        if not os.path.exists(explicit):
            raise FileNotFoundError(f"--model-config: no file {explicit!r}")
        return explicit
    name = cfg.init_from or cfg.model.name  # what the trainer loads
    if os.path.isfile(os.path.join(name, "config.json")):
        return os.path.join(name, "config.json")
    if name in known_models():
        return os.path.join(resolve_model(name), "config.json")
    shipped = os.path.join(os.path.dirname(os.path.abspath(config_file)), "models",
                           os.path.basename(name.rstrip("/")) + ".json")
    if os.path.isfile(shipped):
        return shipped
    key = "init_from" if cfg.init_from else "model.name"
    raise FileNotFoundError(f"config.{key} = {name!r}: no config.json there and no {shipped}; pass "
                            "--model-config FILE (the model's HF config.json)")


# -- the programs' inputs, abstract and laid out ---------------------------------------------------


def _nbytes(x) -> int:
    """Bytes of one device's shard of an abstract array `x` (with its sharding)."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * x.dtype.itemsize


def tree_bytes(tree) -> int:
    """Per-device bytes of a pytree of sharded abstract arrays."""
    import jax

    return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def laid_out(tree, mesh):
    """`tree` (abstract arrays in nnx Variables, and bare ones) with the shardings the trainer gives
    them: a Variable's array by its logical `axes` (parameters, frozen weights, the teacher's copy and
    Adam's moments alike), anything else (step, PRNG key data, Adam's count) replicated."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from sdft_jax.models.sharding import logical_sharding

    replicated = NamedSharding(mesh, PartitionSpec())

    def with_sharding(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    def one(node):
        if isinstance(node, nnx.Variable):
            axes = getattr(node, "axes", None) or (None,) * len(node.shape)
            return node.replace(with_sharding(node.get_value(), logical_sharding(axes, node.shape, mesh)))
        return with_sharding(node, replicated)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _abstract(shape, dtype, sharding):
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def step_batch_shapes(cfg, max_seq_len: int) -> dict[str, int]:
    """The widths of the config's largest step batch: rows, prompt widths (student and teacher, both
    at `prompts.max_prompt_tokens`'s bucket), completion width (`rollout.max_new_tokens`, cut to the
    model's positions as `make_step_batch` cuts it; for SFT, whose targets are not sampled, the same
    width stands for the longest target)."""
    from sdft_jax.padding import bucket_length

    samples = cfg.rollout.samples_per_prompt if cfg.method == "sdft" else 1
    prompt = bucket_length(cfg.prompts.max_prompt_tokens, cfg.rollout.prompt_buckets)
    completion = min(cfg.rollout.max_new_tokens, max_seq_len - prompt)
    if completion < 1:
        raise ValueError(f"config.prompts.max_prompt_tokens = {cfg.prompts.max_prompt_tokens} (bucket {prompt}) "
                         f"leaves no room for a completion within the model's {max_seq_len} positions")
    return {"rows": cfg.train.prompts_per_step * samples, "prompt_len": prompt, "completion_len": completion,
            "micro_batch_size": cfg.train.micro_batch_size}


def abstract_step_batch(shapes: dict[str, int], mesh):
    """A StepBatch of abstract arrays, rows split over the batch axes (`distributed.global_batch`'s)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from sdft_jax.distill.batch import StepBatch
    from sdft_jax.distributed import batch_spec

    sharding = NamedSharding(mesh, batch_spec(mesh))
    B, P, C = shapes["rows"], shapes["prompt_len"], shapes["completion_len"]

    def build() -> StepBatch:  # traced, so that StepBatch's shape checks see arrays
        tokens, mask = jnp.zeros((B, P + C), jnp.int32), jnp.zeros((B, P + C), jnp.bool_)
        return StepBatch(student_tokens=tokens, student_mask=mask, teacher_tokens=tokens, teacher_mask=mask,
                         completion_mask=jnp.zeros((B, C), jnp.bool_), sampler_logprobs=jnp.zeros((B, C), jnp.float32))

    batch = jax.eval_shape(build)
    return jax.tree.map(lambda x: _abstract(x.shape, x.dtype, sharding), batch)


def rollout_shapes(cfg, mesh) -> dict[str, int]:
    """One sampler call's batch (as `Sampler` buckets it: the step's rows up to the largest batch
    bucket, rounded up to a multiple of the batch shards), the calls a step makes, the prompt bucket and
    the cache's slots."""
    from sdft_jax.padding import bucket_length
    from sdft_jax.sampling.sampler import cache_length

    sampling = cfg.rollout.sampling()
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp", "expert"))
    rounded = lambda n: math.ceil(n / shards) * shards  # noqa: E731
    buckets = sampling.batch_buckets
    largest = rounded(buckets[-1])
    rows = cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt
    batch = rounded(bucket_length(min(rows, largest, buckets[-1]), buckets))
    prompt = bucket_length(cfg.prompts.max_prompt_tokens, sampling.prompt_buckets)
    return {"rows": batch, "calls": math.ceil(rows / largest), "prompt_len": prompt,
            "max_new_tokens": sampling.max_new_tokens, "cache_len": cache_length(prompt, sampling.max_new_tokens)}


def abstract_cache(model_cfg, shapes: dict[str, int], dtype, mesh, rules=None):
    """The sampler's stacked KV cache (and a hybrid model's Gated DeltaNet states), abstract, laid out as
    `Sampler` lays it out: keys and values over the batch axes and KV heads, the states over the batch."""
    import jax

    from sdft_jax.models.attention import KVCache
    from sdft_jax.models.sharding import DEFAULT_RULES, logical_sharding

    cache = jax.eval_shape(lambda: KVCache.zeros(model_cfg, shapes["rows"], shapes["cache_len"], dtype))
    axes = {".k": ("layers", "batch", "length", "kv_heads", "head_dim"), ".valid": ("batch", "length"), ".index": ()}
    axes[".v"] = axes[".k"]

    def laid(path, x):  # fields by name; the Gated DeltaNet states (`.linear.*`) over the batch
        names = axes.get(jax.tree_util.keystr(path), ("layers", "batch") + (None,) * (x.ndim - 2))
        return _abstract(x.shape, x.dtype, logical_sharding(names, x.shape, mesh, rules or DEFAULT_RULES))

    return jax.tree_util.tree_map_with_path(laid, cache)


# -- what a compiled program tells ------------------------------------------------------------------


def memory_of(compiled, *, resident: int = 0) -> dict[str, int]:
    """Per-device bytes of a compiled program (`memory_analysis()`), its peak (arguments + outputs +
    temporaries - aliased), and `resident`: other bytes on the device while it runs, in the peak too."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes),
           "generated_code": int(m.generated_code_size_in_bytes)}
    out["program_peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    out["resident"] = resident
    out["peak"] = out["program_peak"] + resident
    return out


# -- the plan, in the process with N devices --------------------------------------------------------


def _compiled(jitted, *args, peak_top: int = 0) -> tuple[Any, dict[str, Any]]:
    """`jitted` lowered and compiled for `args`, the seconds each took, its matmul FLOPs by dtype
    (`matmul_flops.py`), and with `peak_top` > 0 the largest buffers live at the program's peak
    (`peak_buffers.compile_with_peak_buffers`)."""
    start = time.perf_counter()
    traced = jitted.trace(*args)
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    if peak_top:
        compiled, peak = compile_with_peak_buffers(lowered, peak_top)
    else:
        compiled, peak = lowered.compile(), None
    info = {"lower_s": round(lowered_at - start, 2), "compile_s": round(time.perf_counter() - lowered_at, 2),
            **matmul_flops(traced.jaxpr)}
    return compiled, {**info, "peak_buffers": peak} if peak_top else info


def _train_step_plan(cfg, model_cfg, graphdef, state, mesh, peak_top: int = 0) -> dict:
    """The train step compiled on the config's largest step batch: shapes, seconds, bytes, collectives."""
    from sdft_jax.distill.train_step import StepConfig, make_train_step

    shapes = step_batch_shapes(cfg, model_cfg.max_position_embeddings)
    step_cfg = StepConfig(loss=cfg.loss, teacher=cfg.teacher, optim=cfg.optim, total_steps=max(cfg.train.steps, 1),
                          skip_nonfinite=True, micro_batch_size=cfg.train.micro_batch_size)
    step = make_train_step(graphdef, state, step_cfg, mesh=mesh)
    compiled, seconds = _compiled(step, state, abstract_step_batch(shapes, mesh), peak_top=peak_top)
    return {"shapes": shapes, **seconds, "per_device_bytes": memory_of(compiled),
            "collectives": collectives(compiled.as_text())}


def _rollout_plan(cfg, model_cfg, graphdef, state, mesh, state_total: int, chip: str, peak_top: int = 0) -> dict:
    """One sampler call compiled on the rollout weights (`Sampler`'s program: `sample` under the rollout
    rules' activation sharding, the cache donated), with the train state resident beside it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from sdft_jax.models.sharding import activation_sharding, logical_sharding
    from sdft_jax.sampling.rollout_weights import StackedWeights
    from sdft_jax.sampling.sampler import sample

    shapes = rollout_shapes(cfg, mesh)
    spec = cfg.rollout.weights().spec(mesh, platform=CHIP_PLATFORM[chip])
    student = nnx.merge(graphdef, state.params, state.frozen)
    weights = StackedWeights.make(student, spec)  # abstract, like the model
    # A weight the rollout weights pass through (same dtype and layout) is the train state's own array.
    shared = sum(_nbytes(w) for w, x in zip(jax.tree.leaves(weights.state), jax.tree.leaves(nnx.state(student)),
                                            strict=True)
                 if w.dtype == x.dtype and w.sharding.is_equivalent_to(x.sharding, len(x.shape)))
    sampling = cfg.rollout.sampling()
    rows, prompt = shapes["rows"], shapes["prompt_len"]
    two = logical_sharding(("batch", "length"), (rows, prompt), mesh, spec.rules)
    key = jax.eval_shape(lambda: jax.random.key(0))
    cache = abstract_cache(model_cfg, shapes, jnp.dtype(spec.dtype), mesh, spec.rules)
    args = (weights, _abstract((rows, prompt), jnp.int32, two), _abstract((rows, prompt), jnp.bool_, two),
            _abstract((rows,), jnp.int32, logical_sharding(("batch",), (rows,), mesh, spec.rules)),
            _abstract(key.shape, key.dtype, NamedSharding(mesh, PartitionSpec())), cache)

    def rollout(weights, tokens, mask, row_ids, key, cache):
        with activation_sharding(mesh, spec.rules):
            return sample(weights, tokens, mask, key, cfg=sampling, stop_ids=(0,), pad_id=0, row_ids=row_ids,
                          cache=cache)

    compiled, seconds = _compiled(jax.jit(rollout, donate_argnums=(5,)), *args, peak_top=peak_top)
    return {"shapes": shapes, **seconds, "dtype": jnp.dtype(spec.dtype).name,
            "weights_bytes": tree_bytes(weights.state),
            "per_device_bytes": memory_of(compiled, resident=state_total - shared),
            "cache_bytes": tree_bytes(cache), "collectives": collectives(compiled.as_text())}


def plan(a: dict) -> dict:
    """Compiles the config's programs on `a["devices"]` devices (this process's; fake CPU ones from
    `main`) and returns the report (see the module docstring). `a`: `main`'s arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sdft_jax.distill.train_state import abstract_train_state
    from sdft_jax.models.config import ModelConfig
    from sdft_jax.models.sharding import make_mesh
    from sdft_jax.models.transformer import Transformer

    devices = topology_devices(a["topology"]) if a.get("topology") else jax.devices()
    if len(devices) != a["devices"]:
        where = (f"slice {a['topology']}", "(--topology and --devices disagree)") if a.get("topology") else (
            "this process", "(set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported)")
        raise RuntimeError(f"plan: {len(devices)} devices in {where[0]}, {a['devices']} asked for {where[1]}")
    cfg = load_config_file(a["config"], tuple(a.get("set", ())))
    model_json = model_config_path(cfg, a["config"].partition(":")[0], a.get("model_config"))
    model_cfg = ModelConfig.from_hf(model_json)
    mesh = make_mesh(cfg.mesh.shape(), devices)
    model = nnx.eval_shape(lambda: Transformer(
        model_cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(cfg.model.dtype), param_dtype=jnp.dtype(cfg.model.param_dtype),
        lora=cfg.model.lora.adapters(), remat=cfg.model.remat, query_block=cfg.model.query_block))
    graphdef, state = abstract_train_state(model, cfg.optim, train_router=cfg.model.train_router)
    state = laid_out(state, mesh)
    state_bytes = {"params": tree_bytes(state.params), "frozen": tree_bytes(state.frozen),
                   "opt_state": tree_bytes(state.opt_state), "teacher": tree_bytes(state.teacher),
                   "other": tree_bytes((state.step, state.rng))}
    state_bytes["total"] = sum(state_bytes.values())
    peak_top = a.get("peak_buffers", 0)
    programs = {"train_step": _train_step_plan(cfg, model_cfg, graphdef, state, mesh, peak_top)}
    if cfg.method == "sdft" and not a.get("skip_rollout"):
        programs["rollout"] = _rollout_plan(cfg, model_cfg, graphdef, state, mesh, state_bytes["total"], a["chip"],
                                            peak_top)
    row = {"bench": "plan", "config": a["config"], "set": list(a.get("set", ())), "devices": a["devices"],
           "backend": devices[0].platform, "compiler": a.get("compiler", "cpu"), "topology": a.get("topology"),
           "mesh": {k: int(v) for k, v in mesh.shape.items()}, "chip": a["chip"], "model_config": model_json,
           "architecture": model_cfg.architecture,
           "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model))),
           "trained_parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
           "lora_rank": cfg.model.lora.rank, "state_bytes_per_device": state_bytes, "programs": programs,
           "compile_s": round(sum(p["lower_s"] + p["compile_s"] for p in programs.values()), 2)}
    return judged(row, hbm_gib=a.get("hbm_gib") or CHIP_HBM_GIB[a["chip"]], headroom=a["headroom"])


def judged(row: dict, *, hbm_gib: float, headroom: float) -> dict:
    """`row` with the chip's capacity, the budget (capacity less the `headroom` fraction), and whether
    each program and the whole config fit it: `fits`, and the largest peak as `per_device_bytes`."""
    budget = int(hbm_gib * GIB * (1 - headroom))
    programs = {name: {**p, "fits": p["per_device_bytes"]["peak"] <= budget} for name, p in row["programs"].items()}
    return {**row, "hbm_bytes": int(hbm_gib * GIB), "headroom": headroom, "budget_bytes": budget,
            "programs": programs, "per_device_bytes": max(p["per_device_bytes"]["peak"] for p in programs.values()),
            "fits": all(p["fits"] for p in programs.values())}


# -- the command ------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdft_jax.bench plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a trainer config file, FILE or FILE:VARIANT")
    p.add_argument("--devices", type=int, required=True, help="chips (JAX devices) of the slice")
    p.add_argument("--chip", choices=sorted(CHIP_HBM_GIB), required=True,
                   help="HBM per chip: " + ", ".join(f"{k} {v:g} GiB" for k, v in CHIP_HBM_GIB.items()))
    p.add_argument("--hbm-gib", type=float, default=None, help="HBM per chip instead of --chip's (another chip)")
    p.add_argument("--model-config", default=None, help="the model's HF config.json (default: see --help)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help="fraction of HBM kept free (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override before validation, e.g. train.micro_batch_size=4 (repeatable)")
    p.add_argument("--skip-rollout", action="store_true", help="plan the train step only")
    p.add_argument("--compiler", choices=COMPILERS, default=None,
                   help="cpu: XLA:CPU on N fake devices (default); tpu: the TPU compiler, ahead of time for the "
                        "chip's slice, no TPU needed (needs libtpu: pip install 'sdft-jax[tpu]'); native: this "
                        "machine's own GPU or TPU devices (--devices must be their count)")
    p.add_argument("--topology", default=None,
                   help="--compiler tpu: the slice, e.g. v5p:2x4x4 (default: the standard shape of --devices chips)")
    p.add_argument("--native", action="store_true", help="the same as --compiler native")
    p.add_argument("--peak-buffers", type=int, default=0, metavar="K",
                   help="also report the K largest buffer shapes live at each program's memory peak (from XLA's "
                        "debug dump of the compilation; slower)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    if args.devices < 1:
        p.error("--devices must be >= 1")
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        p.error("--hbm-gib must be > 0")
    if not 0 <= args.headroom < 1:
        p.error("--headroom must be in [0, 1)")
    if args.peak_buffers < 0:
        p.error("--peak-buffers must be >= 0")
    if args.native and args.compiler not in (None, "native"):
        p.error(f"--native and --compiler {args.compiler} disagree")
    args.compiler = "native" if args.native else args.compiler or "cpu"
    if args.topology is not None and args.compiler != "tpu":
        p.error("--topology is for --compiler tpu")
    return args


def cpu_model() -> str:
    """The CPU's model name (compile times depend on it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gib(n: int) -> str:
    """`n` bytes in GiB, or in MiB / KiB when smaller."""
    for unit, size in (("GiB", GIB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _print_summary(row: dict) -> None:
    print(f"{row['config']} on {row['devices']} x {row['chip']} ({row['hbm_bytes'] / GIB:g} GiB HBM, "
          f"{row['headroom']:.0%} kept free: budget {_gib(row['budget_bytes'])}), mesh {row['mesh']}, compiled by "
          + (f"the TPU compiler for {row['topology']}" if row.get("topology") else f"XLA:{row['backend'].upper()}"))
    print(f"model {row['architecture']} {row['parameters'] / 1e9:.2f}B parameters, "
          f"{row['trained_parameters'] / 1e9:.3f}B trained; state per device "
          + ", ".join(f"{k} {_gib(v)}" for k, v in row["state_bytes_per_device"].items()))
    for name, p in row["programs"].items():
        m = p["per_device_bytes"]
        print(f"{name}: {p['shapes']}  compile {p['lower_s'] + p['compile_s']:.1f} s")
        print("  per device: " + ", ".join(f"{k} {_gib(v)}" for k, v in m.items() if k != "generated_code")
              + f"  -> {'fits' if p['fits'] else 'DOES NOT FIT'}")
        if p.get("peak_buffers"):
            peak = p["peak_buffers"]
            print(f"  live at the peak: {_gib(peak['live_bytes'])} in {peak['buffers']} buffers; largest: "
                  + ", ".join(f"{b['count']} x {b['shape']} {_gib(b['bytes'])}" for b in peak["by_shape"]))
        flops = p["matmul_flops"]
        print("  matmuls: " + ", ".join(f"{k} {v / 1e12:.2f} TFLOP ({v / max(sum(flops.values()), 1):.0%})"
                                        for k, v in flops.items())
              + (f" ({p['matmul_loops_counted_once']} loop(s) counted once)" if p["matmul_loops_counted_once"] else "")
              + "".join(f"; not counted: {n} x {k}" for k, n in p["matmul_kernels_not_counted"].items()))
        for kind, c in p["collectives"].items():
            print(f"  {kind}: {c['count']} in the program ({_gib(c['bytes'])}), {c['executed']} executed "
                  f"({_gib(c['executed_bytes'])})")
    print(f"per device peak {_gib(row['per_device_bytes'])}: {'fits' if row['fits'] else 'DOES NOT FIT'}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    a = {"config": args.config, "devices": args.devices, "chip": args.chip, "model_config": args.model_config,
         "hbm_gib": args.hbm_gib, "headroom": args.headroom, "set": args.set, "skip_rollout": args.skip_rollout,
         "compiler": args.compiler, "peak_buffers": args.peak_buffers}
    try:  # a bad config or model config fails here, in a second, before anything compiles
        cfg = load_config_file(args.config, tuple(args.set))
        model_config_path(cfg, args.config.partition(":")[0], args.model_config)
        if args.compiler == "tpu":
            a["topology"] = args.topology or tpu_topology(args.chip, args.devices)
            if importlib.util.find_spec("libtpu") is None:
                raise ValueError("--compiler tpu needs the TPU compiler, the libtpu package: "
                                 "pip install 'sdft-jax[tpu]' (it runs on a machine without a TPU)")
    except (OSError, ValueError) as e:
        print(f"plan: {e}", file=sys.stderr)
        return 1
    # The child's devices: N fake CPU ones (the flags must be in its environment before it imports jax),
    # or a CPU one beside the TPU slice it compiles for (`topology_devices`).
    saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if args.compiler != "native":
        count = args.devices if args.compiler == "cpu" else 1
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", saved["XLA_FLAGS"] or "").strip()
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
    loadavg_start = round(os.getloadavg()[0], 2)
    try:
        row = in_fresh_process(plan, a)
    except (RuntimeError, OSError, ValueError) as e:
        print(f"plan: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    # Compile times depend on the CPU and on what else runs on it.
    row.update(cpu=cpu_model(), loadavg_start=loadavg_start, loadavg_end=round(os.getloadavg()[0], 2))
    if not args.json:
        _print_summary(row)
    print(json.dumps(row))
    return 0 if row["fits"] else 3


if __name__ == "__main__":
    sys.exit(main())
