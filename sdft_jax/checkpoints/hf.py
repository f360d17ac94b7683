"""HF model directories <-> our Transformer: the name mapping, sharded loading and export.

Which HF tensor holds which of our parameters is the family's table (`hf_names`); a stacked weight
of ours covers the layers that have its part (`decoder.part_layers`: a MoE model's experts only its
sparse layers), so its HF names carry those layers' global indices.

Loading builds the model abstractly (no memory), then creates each parameter directly on its target
sharding with `jax.make_array_from_callback`, one parameter at a time from memory-mapped safetensors:
the host holds at most one stacked weight (one projection over all its layers, e.g. every expert's
gate over the sparse layers) at once, never the model. The routed experts' layout (per-expert tensors
or fused) is read from the checkpoint's names (`checkpoint_expert_layout`).
Export writes safetensors + config.json that `transformers` loads, with LoRA adapters folded in (the
routed experts' per expert), the experts per expert unless asked for the fused layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import save_file

from sdft_jax import storage
from sdft_jax.cache import atomic_directory, cache_root
from sdft_jax.distributed import to_host
from sdft_jax.checkpoints import hf_names
from sdft_jax.checkpoints.hf_names import ExpertLayout
from sdft_jax.checkpoints.safetensors_io import INDEX_FILE, SafetensorsDir
from sdft_jax.models import decoder
from sdft_jax.models import lora as lora_lib
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, logical_sharding
from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK, RematPolicy, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# Tensors some checkpoints carry that the model recomputes; safe to ignore.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Placement:
    """One of our parameters in an HF checkpoint: its table row, and the layers it is stacked over
    (None for a parameter outside the decoder stack)."""

    entry: hf_names.TensorName
    layers: tuple[int, ...] | None


def _placements(cfg: ModelConfig, keys, expert_layout: ExpertLayout) -> dict[tuple[str, ...], _Placement]:
    """Each of our parameter paths (`keys`, LoRA adapters excluded) -> where it lives in HF."""
    table = hf_names.family_table(cfg.architecture, expert_layout)
    shapes = decoder.part_shapes(cfg)
    layers_of = {name: layers for part, layers in decoder.part_layers(cfg).items() for name in shapes[part]}
    out = {}
    for key in keys:
        name = key[-1]
        if name not in table:
            raise ValueError(f"no HF tensor for parameter {'.'.join(key)} of a {cfg.architecture} model")
        entry = table[name]
        stacked = key[0] == "layers"
        if stacked != entry.per_layer:
            raise ValueError(f"the {cfg.architecture} table places {'.'.join(key)} at {entry.hf_name!r}")
        out[key] = _Placement(entry, layers_of[name] if stacked else None)
    return out


def _hf_names_of(placement: _Placement, cfg: ModelConfig) -> list[str]:
    experts = cfg.moe.num_experts if cfg.moe is not None else 0
    return placement.entry.names(placement.layers or (), experts)


def checkpoint_expert_layout(path: str | os.PathLike) -> ExpertLayout | None:
    """The routed experts' layout of the checkpoint in model directory `path` (`hf_names.ExpertLayout`),
    or None when it has no routed experts: what a trainer passes to `save_hf` to export what it loaded."""
    path = check_model_dir(path)
    return hf_names.expert_layout_of_names(SafetensorsDir(path).names, path)


def check_model_dir(path: str | os.PathLike) -> str:
    """Returns the directory path, or raises a clear error if it cannot hold an HF model."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a model directory")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: missing config.json")
    return path


def load_hf(
    path: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    lora: lora_lib.LoraConfig | None = None,
    remat: RematPolicy = "none",
    query_block: int = DEFAULT_QUERY_BLOCK,
    seed: int = 0,
) -> Transformer:
    """Loads an HF model directory (safetensors only) into a Transformer, sharded over `mesh` if given."""
    path = check_model_dir(path)
    cfg = ModelConfig.from_hf(path)
    tensors = SafetensorsDir(path)
    make = lambda: Transformer(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                               lora=lora, remat=remat, query_block=query_block)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    flat_abstract = nnx.to_flat_state(abstract)
    layout = hf_names.expert_layout_of_names(tensors.names, path) or "per_expert"
    placements = _placements(cfg, [k for k, v in flat_abstract if not isinstance(v, nnx.LoRAParam)], layout)
    _check_names(path, cfg, tensors, placements)

    def sharding_of(var) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return logical_sharding(var.axes, var.shape, mesh, rules)

    flat = []
    lora_paths = []
    for key, var in flat_abstract:
        if isinstance(var, nnx.LoRAParam):
            lora_paths.append(key)
            flat.append((key, var))
            continue
        host = _read_param(path, tensors, placements[key], var.shape, param_dtype)
        value = jax.make_array_from_callback(var.shape, sharding_of(var), lambda idx, h=host: h[idx])
        flat.append((key, var.replace(value)))
        del host
    if lora_paths:
        # Adapters are fresh: run the model's own initialiser (XLA drops the unused base weights).
        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        lora_abstract = nnx.state(nnx.eval_shape(make), nnx.LoRAParam)
        shardings = jax.tree.map(lambda v: v.replace(sharding_of(v)), lora_abstract, is_leaf=is_var)
        values = dict(nnx.to_flat_state(jax.jit(lambda: nnx.state(make(), nnx.LoRAParam),
                                                out_shardings=shardings)()))
        flat = [(k, values[k] if k in values else v) for k, v in flat]
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)


def _check_names(path: str, cfg: ModelConfig, tensors: SafetensorsDir,
                 placements: dict[tuple[str, ...], _Placement]) -> None:
    expected = {n for p in placements.values() for n in _hf_names_of(p, cfg)}
    missing = sorted(expected - tensors.names)
    if missing:
        raise ValueError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")
    extra = sorted(n for n in tensors.names - expected
                   if not n.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise ValueError(
            f"{path}: {len(extra)} checkpoint tensors are not used by the {cfg.architecture} architecture, "
            f"e.g. {extra[:5]} (wrong model_type in config.json?)"
        )


def _read_param(path, tensors: SafetensorsDir, placement: _Placement, shape, param_dtype) -> np.ndarray:
    """One of our parameters as a host array in `param_dtype`, read (and stacked over its layers, and
    its experts for a per-expert tensor) from the checkpoint."""
    entry = placement.entry
    out = np.empty(shape, dtype=np.dtype(param_dtype))
    layers = placement.layers if placement.layers is not None else (0,)
    lead = 1 if placement.layers is not None else 0  # our layers axis
    experts = shape[lead] if entry.per_expert else 1
    for j, i in enumerate(layers):
        for e in range(experts):
            index = (j,) * lead + (e,) * entry.per_expert
            expected = tuple(shape[len(index):])
            name = entry.hf_name.format(i=i, e=e)
            raw = tensors.read(name)
            want = _hf_shape(entry, expected)
            if tuple(raw.shape) != want:
                raise ValueError(f"{path}: tensor {name} has shape {tuple(raw.shape)}, expected {want} "
                                 "from config.json")
            out[index] = entry.transform.to_ours(_piece(raw, entry.piece), expected).astype(out.dtype)
    return out


def _hf_shape(entry: hf_names.TensorName, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for ours of shape `ours` (the whole fused tensor for a piece)."""
    shape = list(entry.transform.hf_shape(ours))
    if entry.piece is not None:
        axis, _, count = entry.piece
        shape[axis] *= count
    return tuple(shape)


def _piece(raw: np.ndarray, piece: tuple[int, int, int] | None) -> np.ndarray:
    """Piece `index` of `count` along `axis` of a fused tensor (a view), the whole tensor when `piece`
    is None."""
    if piece is None:
        return raw
    axis, index, count = piece
    n = raw.shape[axis] // count
    return raw[(slice(None),) * axis + (slice(index * n, (index + 1) * n),)]


def export_tensors(model: Transformer, dtype=np.float32, *,
                   expert_layout: ExpertLayout = "per_expert") -> dict[str, np.ndarray]:
    """HF-named host tensors of `model`, with LoRA adapters merged into their base weights; a MoE
    model's routed experts in `expert_layout` (`hf_names`: per-expert tensors, as `transformers` saves
    and vLLM loads, or fused)."""
    cfg = model.cfg
    layers = model.layers
    merged = {}
    if layers.lora is not None:
        for name in layers.adapted:
            merged[("layers", name)] = lora_lib.merged_weight(
                getattr(layers, name)[...], getattr(layers, f"{name}_lora_a")[...],
                getattr(layers, f"{name}_lora_b")[...], layers.lora.scale, name)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    placements = _placements(cfg, [k for k, _ in flat], expert_layout)
    out: dict[str, np.ndarray] = {}
    pieces: dict[str, tuple[tuple[int, int, int], dict[int, np.ndarray]]] = {}  # fused name -> its pieces
    for key, var in flat:
        entry, stacked = placements[key].entry, placements[key].layers
        host = to_host(merged.get(key, var[...])).astype(np.float32)
        for j, i in enumerate(stacked if stacked is not None else (0,)):
            value = host[j] if stacked is not None else host
            for e in range(value.shape[0] if entry.per_expert else 1):
                name = entry.hf_name.format(i=i, e=e)
                tensor = entry.transform.to_hf(value[e] if entry.per_expert else value)
                if entry.piece is None:
                    out[name] = np.ascontiguousarray(tensor).astype(dtype)
                else:
                    pieces.setdefault(name, (entry.piece, {}))[1][entry.piece[1]] = tensor
    for name, ((axis, _, count), parts) in pieces.items():
        if sorted(parts) != list(range(count)):
            raise ValueError(f"export: {name} is fused from {count} pieces, the model has {sorted(parts)}")
        out[name] = np.ascontiguousarray(np.concatenate([parts[k] for k in range(count)], axis=axis)).astype(dtype)
    return out


def save_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype=np.float32,
    max_shard_bytes: int = 4 << 30,
    expert_layout: ExpertLayout = "per_expert",
) -> None:
    """Writes an HF directory (config.json, safetensors, tokenizer files) atomically, from process 0.

    A remote `out_dir` (`gs://`) is built in a local temporary directory and uploaded with config.json
    last: a remote export is complete when its config.json exists, and one without it (an interrupted
    upload) is replaced. A MoE model's routed experts are written in `expert_layout` (`export_tensors`;
    `checkpoint_expert_layout(path)` tells the layout of a checkpoint directory).
    """
    tensors = export_tensors(model, dtype, expert_layout=expert_layout)
    if jax.process_index() != 0:
        return
    out_dir = os.fspath(out_dir)
    remote = storage.is_remote(out_dir)
    if storage.exists(os.path.join(out_dir, "config.json") if remote else out_dir):
        raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite an export")
    if not remote:
        _write_export(model, tensors, out_dir, tokenizer_dir, dtype, max_shard_bytes)
        return
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=cache_root()) as scratch:
        local = os.path.join(scratch, "export")
        _write_export(model, tensors, local, tokenizer_dir, dtype, max_shard_bytes)
        storage.rmtree(out_dir)  # what an interrupted upload left
        storage.copy_tree(local, out_dir, last=["config.json"])


def _write_export(model: Transformer, tensors: dict[str, np.ndarray], out_dir: str, tokenizer_dir, dtype,
                  max_shard_bytes: int) -> None:
    with atomic_directory(out_dir) as tmp:
        config = model.cfg.to_hf_dict()
        config["torch_dtype"] = "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else "float32"
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(os.fspath(tokenizer_dir), name)
                if os.path.exists(src):
                    shutil.copy(src, tmp)


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(v.nbytes for v in tensors.values())
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
