"""HF model directories <-> our Transformer: the name mapping, sharded loading and export.

Which HF tensor holds which of our parameters is the family's table (`hf_names`); a stacked weight
of ours covers the layers that have its part (`decoder.part_layers`: a MoE model's experts only its
sparse layers), so its HF names carry those layers' global indices.

Loading builds the model abstractly (no memory), then creates each parameter directly on its target
sharding with `jax.make_array_from_callback`, one parameter at a time from memory-mapped safetensors:
the host holds at most one stacked weight (one projection over all its layers, e.g. every expert's
gate over the sparse layers) at once, never the model. The routed experts' layout (per-expert tensors
or fused) and the text model's (`causal_lm`, or Qwen3.5's multimodal `conditional_generation`) are
read from the checkpoint's names (`checkpoint_expert_layout`, `hf_names.model_layout_of_names`);
tensors the text model does not use (`hf_names.unused_prefixes`: Qwen3.5's vision tower and MTP
head) are counted in one log line and left on disk.

Export writes safetensors + config.json that `transformers` loads, with LoRA adapters folded in (the
routed experts' per expert). Given the model's source directory (`save_hf(source_dir=...)`), the
export is a drop-in replacement of it: the source's config.json, its layouts, and its unused tensors
copied through unchanged; without one, a causal LM with the experts per expert.
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from sdft_jax.cache import atomic_directory, cache_root, remove_partials
from sdft_jax.distributed import to_host
from sdft_jax.checkpoints import hf_names
from sdft_jax.checkpoints.hf_names import ExpertLayout, ModelLayout
from sdft_jax.checkpoints.safetensors_io import FLOAT_DTYPES, INDEX_FILE, SafetensorsDir
from sdft_jax.errors import ModelError
from sdft_jax.models import decoder
from sdft_jax.models import lora as lora_lib
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, logical_sharding
from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK, RematPolicy, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# Tensors some checkpoints carry that the model recomputes; safe to ignore.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPE_KEYS = ("dtype", "torch_dtype")  # config.json's dtype, as transformers 5 / 4 spell it

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Placement:
    """One of our parameters in an HF checkpoint: its name, its table row, and the layers it is
    stacked over (None for a parameter outside the decoder stack)."""

    name: str
    entry: hf_names.TensorName
    layers: tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class _Mapping:
    """Our parameters' places in one HF layout: by parameter path, the family's table, and each
    parameter's shape per HF tensor (`hf_names.Shapes`, which sizes the pieces of fused tensors)."""

    placements: dict[tuple[str, ...], _Placement]
    table: dict[str, hf_names.TensorName]
    shapes: dict[str, tuple[int, ...]]

    def hf_shape(self, name: str) -> tuple[int, ...]:
        return hf_names.hf_shape(name, self.table, self.shapes)


def _mapping(cfg: ModelConfig, params, expert_layout: ExpertLayout, layout: ModelLayout = "causal_lm") -> _Mapping:
    """Where each of our parameters (`params`: (path, shape) pairs, LoRA adapters excluded) lives in HF."""
    table = hf_names.family_table(cfg.architecture, expert_layout, layout)
    layers_of = {name: layers for part, layers in decoder.part_layers(cfg).items()
                 for name in decoder.part_shapes(cfg)[part]}
    out, shapes = {}, {}
    for key, shape in params:
        name = key[-1]
        if name not in table:
            raise ValueError(f"no HF tensor for parameter {'.'.join(key)} of a {cfg.architecture} model")
        entry = table[name]
        stacked = key[0] == "layers"
        if stacked != entry.per_layer:
            raise ValueError(f"the {cfg.architecture} table places {'.'.join(key)} at {entry.hf_name!r}")
        out[key] = _Placement(name, entry, layers_of[name] if stacked else None)
        shapes[name] = tuple(shape)[int(stacked) + int(entry.per_expert):]
    return _Mapping(out, table, shapes)


def _hf_names_of(placement: _Placement, cfg: ModelConfig) -> list[str]:
    experts = cfg.moe.num_experts if cfg.moe is not None else 0
    return placement.entry.names(placement.layers or (), experts)


def checkpoint_expert_layout(path: str | os.PathLike) -> ExpertLayout | None:
    """The routed experts' layout of the checkpoint in model directory `path` (`hf_names.ExpertLayout`),
    or None when it has no routed experts: what a trainer passes to `save_hf` to export what it loaded."""
    path = check_model_dir(path)
    return _layouts(SafetensorsDir(path), path)[0]


def _layouts(tensors: SafetensorsDir, path: str) -> tuple[ExpertLayout | None, ModelLayout]:
    """The routed experts' layout (None without experts) and the text model's layout of a checkpoint,
    read from its names; names that fit no layout are the checkpoint's error (`ModelError`)."""
    try:
        return (hf_names.expert_layout_of_names(tensors.names, path),
                hf_names.model_layout_of_names(tensors.names, path))
    except ValueError as e:
        raise ModelError(str(e)) from e


def check_model_dir(path: str | os.PathLike) -> str:
    """Returns the directory path, or raises a `ModelError` if it cannot hold an HF model."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ModelError(f"{path}: not a model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelError(f"{path}: missing config.json")
    return path


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of model directory `path`; anything its config.json gets wrong (not JSON, not
    an object, a value of the wrong type or out of range, an unsupported model) is a `ModelError`
    naming the file."""
    path = check_model_dir(path)
    file = os.path.join(path, "config.json")
    try:
        return ModelConfig.from_hf(path)
    except (ModelError, ImportError, OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001  transformers' config classes raise assorted errors on bad values
        detail = " ".join(str(e).split())  # huggingface_hub's validation errors span lines
        if detail.startswith(file):
            raise ModelError(detail) from e
        if detail.startswith(path):  # the directory named: name the file
            raise ModelError(file + detail[len(path):]) from e
        raise ModelError(f"{file}: {type(e).__name__}: {detail}") from e


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
    attention: str = "auto",
    seed: int = 0,
) -> Transformer:
    """Loads an HF model directory (safetensors only) into a Transformer, sharded over `mesh` if given."""
    cfg = read_model_config(path)
    path = os.fspath(path)
    tensors = SafetensorsDir(path)
    make = lambda: Transformer(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,  # noqa: E731
                               lora=lora, remat=remat, query_block=query_block, attention=attention)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    flat_abstract = nnx.to_flat_state(abstract)
    expert_layout, layout = _layouts(tensors, path)
    expert_layout = expert_layout or "per_expert"
    mapping = _mapping(cfg, [(k, v.shape) for k, v in flat_abstract if not isinstance(v, nnx.LoRAParam)],
                       expert_layout, layout)
    _check_names(path, cfg, tensors, mapping)

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
        host = _read_param(path, tensors, mapping, key, var.shape, param_dtype)
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


def _check_names(path: str, cfg: ModelConfig, tensors: SafetensorsDir, mapping: _Mapping) -> None:
    expected = {n for p in mapping.placements.values() for n in _hf_names_of(p, cfg)}
    missing = sorted(expected - tensors.names)
    if missing:
        raise ModelError(f"{path}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}")
    unused = hf_names.unused_prefixes(cfg.architecture)
    extra = sorted(n for n in tensors.names - expected
                   if not n.endswith(_IGNORED_SUFFIXES) and not n.startswith(unused)
                   and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if extra:
        raise ModelError(
            f"{path}: {len(extra)} checkpoint tensors are not used by the {cfg.architecture} architecture, "
            f"e.g. {extra[:5]} (wrong model_type in config.json?)"
        )
    counts = {prefix: sum(n.startswith(prefix) for n in tensors.names) for prefix in unused}
    if any(counts.values()):
        logger.info("%s: %d tensors the text model does not use (%s), left on disk; an export with "
                    "source_dir copies them through", path, sum(counts.values()),
                    ", ".join(f"{prefix}*: {n}" for prefix, n in counts.items()))


def _read_param(path, tensors: SafetensorsDir, mapping: _Mapping, key: tuple[str, ...], shape,
                param_dtype) -> np.ndarray:
    """One of our parameters as a host array in `param_dtype`, read (and stacked over its layers, and
    its experts for a per-expert tensor; its piece of a fused tensor) from the checkpoint."""
    placement = mapping.placements[key]
    entry = placement.entry
    out = np.empty(shape, dtype=np.dtype(param_dtype))
    layers = placement.layers if placement.layers is not None else (0,)
    lead = 1 if placement.layers is not None else 0  # our layers axis
    experts = shape[lead] if entry.per_expert else 1
    want = mapping.hf_shape(placement.name)
    for j, i in enumerate(layers):
        for e in range(experts):
            index = (j,) * lead + (e,) * entry.per_expert
            expected = tuple(shape[len(index):])
            name = entry.hf_name.format(i=i, e=e)
            held = tensors.entry(name)
            if held.shape != want:
                raise ModelError(f"{held.file}: tensor {name} has shape {held.shape}, expected {want} "
                                 "from config.json")
            if held.dtype not in FLOAT_DTYPES:
                raise ModelError(f"{held.file}: tensor {name} has dtype {held.dtype}, expected a floating-point "
                                 f"one ({', '.join(FLOAT_DTYPES)})")
            raw = tensors.read(name)
            piece = hf_names.take_piece(raw, placement.name, mapping.table, mapping.shapes)
            out[index] = entry.transform.to_ours(piece, expected).astype(out.dtype)
    return out


def export_tensors(model: Transformer, dtype=np.float32, *, expert_layout: ExpertLayout = "per_expert",
                   layout: ModelLayout = "causal_lm") -> dict[str, np.ndarray]:
    """HF-named host tensors of `model`, with LoRA adapters merged into their base weights; a MoE
    model's routed experts in `expert_layout` (`hf_names`: per-expert tensors, as `transformers` saves
    and vLLM loads, or fused), the text model named as in `layout` (`hf_names.ModelLayout`)."""
    cfg = model.cfg
    layers = model.layers
    merged = {}
    if layers.lora is not None:
        for name in layers.adapted:
            merged[("layers", name)] = lora_lib.merged_weight(
                getattr(layers, name)[...], getattr(layers, f"{name}_lora_a")[...],
                getattr(layers, f"{name}_lora_b")[...], layers.lora.scale, name)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    mapping = _mapping(cfg, [(k, v.shape) for k, v in flat], expert_layout, layout)
    out: dict[str, np.ndarray] = {}
    pieces: dict[str, tuple[hf_names.Piece, dict[str, np.ndarray]]] = {}  # fused name -> its pieces
    for key, var in flat:
        placement = mapping.placements[key]
        entry, stacked = placement.entry, placement.layers
        host = to_host(merged.get(key, var[...])).astype(np.float32)
        for j, i in enumerate(stacked if stacked is not None else (0,)):
            value = host[j] if stacked is not None else host
            for e in range(value.shape[0] if entry.per_expert else 1):
                name = entry.hf_name.format(i=i, e=e)
                tensor = entry.transform.to_hf(value[e] if entry.per_expert else value)
                if entry.piece is None:
                    out[name] = np.ascontiguousarray(tensor).astype(dtype)
                else:
                    pieces.setdefault(name, (entry.piece, {}))[1][placement.name] = tensor
    for name, (piece, parts) in pieces.items():
        try:
            joined = hf_names.join_pieces(parts, piece, mapping.shapes)
        except ValueError as e:
            raise ValueError(f"export: {name}: {e}") from e
        out[name] = np.ascontiguousarray(joined).astype(dtype)
    return out


def save_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
    dtype=np.float32,
    max_shard_bytes: int = 4 << 30,
    expert_layout: ExpertLayout | None = None,
) -> None:
    """Writes an HF directory (config.json, safetensors, tokenizer files) atomically, from process 0.

    With `source_dir` (the HF directory the model was loaded from) the export replaces it: its
    config.json (the dtype entry set to `dtype`), its text layout, its routed experts' layout, and
    its tensors the model does not use (Qwen3.5's vision tower and MTP head) copied unchanged. Without
    one: the model's own config.json (`ModelConfig.to_hf_dict`, a causal LM). `expert_layout` overrides
    the experts' layout (default: the source's, else per expert; `export_tensors`).

    A remote `out_dir` (`gs://`) is built in a local temporary directory and uploaded with config.json
    last: a remote export is complete when its config.json exists, and one without it (an interrupted
    upload) is replaced. A local export is built under `.{name}.partial-*` beside `out_dir` and renamed
    into place; what a killed export left there is removed first.
    """
    layout: ModelLayout = "causal_lm"
    carried: dict[str, np.ndarray] = {}
    if source_dir is None:
        config = model.cfg.to_hf_dict()
        config["torch_dtype"] = _dtype_name(dtype)
    else:
        source_dir = check_model_dir(source_dir)
        config = _source_config(model.cfg, source_dir, dtype)
        source = SafetensorsDir(source_dir)
        source_experts, layout = _layouts(source, source_dir)
        expert_layout = expert_layout or source_experts
        unused = hf_names.unused_prefixes(model.cfg.architecture)
        carried = {n: source.read(n) for n in sorted(source.names) if n.startswith(unused)}
    tensors = export_tensors(model, dtype, expert_layout=expert_layout or "per_expert", layout=layout)
    tensors.update(carried)
    if jax.process_index() != 0:
        return
    out_dir = os.fspath(out_dir)
    remote = storage.is_remote(out_dir)
    if storage.exists(os.path.join(out_dir, "config.json") if remote else out_dir):
        raise FileExistsError(f"{out_dir}: already exists; refusing to overwrite an export")
    if not remote:
        _write_export(config, tensors, out_dir, tokenizer_dir, max_shard_bytes)
        return
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="export-", dir=cache_root()) as scratch:
        local = os.path.join(scratch, "export")
        _write_export(config, tensors, local, tokenizer_dir, max_shard_bytes)
        storage.rmtree(out_dir)  # what an interrupted upload left
        storage.copy_tree(local, out_dir, last=["config.json"])


def _dtype_name(dtype) -> str:
    return "bfloat16" if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else "float32"


def _source_config(cfg: ModelConfig, source_dir: str, dtype) -> dict:
    """The source directory's config.json for an export of a model of `cfg`, its dtype entry set to
    `dtype`; refuses a source that describes another model."""
    source_cfg = read_model_config(source_dir)
    if source_cfg != cfg:
        differ = [f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(source_cfg, f.name)]
        raise ModelError(f"{source_dir}: config.json describes another model than the one exported "
                         f"(fields {differ} differ)")
    with open(os.path.join(source_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key in [k for k in _DTYPE_KEYS if k in config] or ["torch_dtype"]:
        config[key] = _dtype_name(dtype)
    return config


def _write_export(config: dict, tensors: dict[str, np.ndarray], out_dir: str, tokenizer_dir,
                  max_shard_bytes: int) -> None:
    # What an earlier export killed mid-write left beside it (`.export.partial-*`): never read, removed.
    remove_partials(os.path.dirname(os.path.abspath(out_dir)), name=os.path.basename(out_dir.rstrip("/")))
    with atomic_directory(out_dir) as tmp:
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
