"""HF model directories <-> our Transformer: the name mapping, sharded loading and export.

Loading builds the model abstractly (no memory), then creates each parameter directly on its target
sharding with `jax.make_array_from_callback`, one parameter at a time from memory-mapped safetensors:
the host holds at most one stacked weight (one projection over all layers) at once, never the model.
Export writes safetensors + config.json that `transformers` loads, with LoRA adapters folded in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable

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
from sdft_jax.checkpoints.safetensors_io import INDEX_FILE, SafetensorsDir
from sdft_jax.models import lora as lora_lib
from sdft_jax.models.config import ModelConfig
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, logical_sharding
from sdft_jax.models.transformer import DEFAULT_QUERY_BLOCK, RematPolicy, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# Tensors some checkpoints carry that the model recomputes; safe to ignore.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one of our parameters is stored in HF: per-layer names and the layout transforms."""

    hf_name: str  # with "{i}" for the layer index when stacked
    stacked: bool
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _rules(cfg: ModelConfig) -> dict[tuple[str, ...], _Rule]:
    D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = lambda x: x  # noqa: E731
    t = lambda x: x.T  # noqa: E731

    def heads_in(n):  # HF [n*E, D] -> ours [D, n, E]
        return _Rule("", True, lambda x: x.T.reshape(D, n, E), lambda x: x.reshape(D, n * E).T)

    attn = "model.layers.{i}.self_attn."
    mlp = "model.layers.{i}.mlp."
    out: dict[tuple[str, ...], _Rule] = {
        ("embed",): _Rule("model.embed_tokens.weight", False, same, same),
        ("final_norm",): _Rule("model.norm.weight", False, same, same),
        ("layers", "input_layernorm"): _Rule("model.layers.{i}.input_layernorm.weight", True, same, same),
        ("layers", "post_attention_layernorm"): _Rule(
            "model.layers.{i}.post_attention_layernorm.weight", True, same, same),
        ("layers", "q_proj"): dataclasses.replace(heads_in(H), hf_name=attn + "q_proj.weight"),
        ("layers", "k_proj"): dataclasses.replace(heads_in(K), hf_name=attn + "k_proj.weight"),
        ("layers", "v_proj"): dataclasses.replace(heads_in(K), hf_name=attn + "v_proj.weight"),
        ("layers", "o_proj"): _Rule(attn + "o_proj.weight", True, lambda x: x.T.reshape(H, E, D),
                                    lambda x: x.reshape(H * E, D).T),
        ("layers", "gate_proj"): _Rule(mlp + "gate_proj.weight", True, t, t),
        ("layers", "up_proj"): _Rule(mlp + "up_proj.weight", True, t, t),
        ("layers", "down_proj"): _Rule(mlp + "down_proj.weight", True, t, t),
    }
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = _Rule("lm_head.weight", False, t, t)
    if cfg.qkv_bias:
        for name, n in (("q", H), ("k", K), ("v", K)):
            out[("layers", f"{name}_bias")] = _Rule(
                attn + f"{name}_proj.bias", True, lambda x, n=n: x.reshape(n, E), lambda x, n=n: x.reshape(n * E))
    if cfg.o_bias:
        out[("layers", "o_bias")] = _Rule(attn + "o_proj.bias", True, same, same)
    if cfg.qk_norm:
        out[("layers", "q_norm")] = _Rule(attn + "q_norm.weight", True, same, same)
        out[("layers", "k_norm")] = _Rule(attn + "k_norm.weight", True, same, same)
    return out


def _hf_names(rule: _Rule, num_layers: int) -> list[str]:
    return [rule.hf_name.format(i=i) for i in range(num_layers)] if rule.stacked else [rule.hf_name]


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
    rules_by_path = _rules(cfg)
    _check_names(path, cfg, tensors, rules_by_path)

    def sharding_of(var) -> jax.sharding.Sharding:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return logical_sharding(var.axes, var.shape, mesh, rules)

    flat = []
    lora_paths = []
    for key, var in nnx.to_flat_state(abstract):
        if isinstance(var, nnx.LoRAParam):
            lora_paths.append(key)
            flat.append((key, var))
            continue
        rule = rules_by_path[key]
        host = _read_stacked(path, tensors, rule, cfg.num_layers, var.shape, param_dtype)
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


def _check_names(path: str, cfg: ModelConfig, tensors: SafetensorsDir, rules) -> None:
    expected = {n for r in rules.values() for n in _hf_names(r, cfg.num_layers)}
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


def _read_stacked(path, tensors: SafetensorsDir, rule: _Rule, num_layers: int, shape, param_dtype) -> np.ndarray:
    """One of our parameters as a host array in `param_dtype`, read (and stacked) from the checkpoint."""
    names = _hf_names(rule, num_layers)
    expected = shape[1:] if rule.stacked else shape
    out = np.empty(shape, dtype=np.dtype(param_dtype))
    for i, name in enumerate(names):
        raw = tensors.read(name)
        try:
            value = rule.to_ours(raw)
        except ValueError:
            value = None
        if value is None or value.shape != tuple(expected):
            want = rule.to_hf(np.empty(expected, np.float32)).shape
            raise ValueError(f"{path}: tensor {name} has shape {tuple(raw.shape)}, expected {tuple(want)} "
                             "from config.json")
        if rule.stacked:
            out[i] = value.astype(out.dtype)
        else:
            out[...] = value.astype(out.dtype)
    return out


def export_tensors(model: Transformer, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named host tensors of `model`, with LoRA adapters merged into their base weights."""
    cfg = model.cfg
    layers = model.layers
    merged = {}
    if layers.lora is not None:
        for name in layers.lora.targets:
            merged[("layers", name)] = lora_lib.merged_weight(
                getattr(layers, name)[...], getattr(layers, f"{name}_lora_a")[...],
                getattr(layers, f"{name}_lora_b")[...], layers.lora.scale)
    rules = _rules(cfg)
    out = {}
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam))):
        rule = rules[key]
        host = to_host(merged.get(key, var[...])).astype(np.float32)
        for i, name in enumerate(_hf_names(rule, cfg.num_layers)):
            out[name] = np.ascontiguousarray(rule.to_hf(host[i] if rule.stacked else host)).astype(dtype)
    return out


def save_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype=np.float32,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Writes an HF directory (config.json, safetensors, tokenizer files) atomically, from process 0.

    A remote `out_dir` (`gs://`) is built in a local temporary directory and uploaded with config.json
    last: a remote export is complete when its config.json exists, and one without it (an interrupted
    upload) is replaced.
    """
    tensors = export_tensors(model, dtype)
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
