"""The whole jitted step against the same step in `transformers` torch, and on sharded meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.checkpoints.hf import export_tensors, load_hf
from sdft_jax.distill import teacher as teacher_lib
from sdft_jax.distill.batch import make_step_batch
from sdft_jax.distill.losses import LossConfig
from sdft_jax.distill.train_state import OptimConfig, init_train_state, student_model
from sdft_jax.distill.train_step import StepConfig, make_train_step, shard_batch
from sdft_jax.models.lora import LoraConfig
from sdft_jax.models.sharding import make_mesh

LR = 1e-3
# Adam divides each gradient element by its own magnitude (plus eps), so for near-zero gradients it
# amplifies fp32 summation-order differences between XLA and torch by up to 1/eps. eps = 1e-6 (in
# both implementations) bounds that to ~1e-3 of LR for 1e-9 gradient differences; at the default
# 1e-8 a single element whose gradient is ~1e-8 can differ by a few percent of LR.
EPS = 1e-6


def random_batch(seed=0, rows=4, vocab=300):
    rng = np.random.default_rng(seed)
    lens = lambda lo, hi: rng.integers(lo, hi, rows)  # noqa: E731
    student = [rng.integers(3, vocab, n).tolist() for n in lens(3, 9)]
    teacher = [rng.integers(3, vocab, n).tolist() for n in lens(8, 15)]
    completions = [rng.integers(3, vocab, n).tolist() for n in lens(5, 12)]
    completions[-1] = completions[-1][:2]  # shorter than skip_first_tokens: a row with nothing scored
    return make_step_batch(student, teacher, completions, pad_id=0,
                           sampler_logprobs=[list(-rng.random(len(c))) for c in completions])


def step_config(loss, teacher_mode="ema", **loss_kwargs):
    return StepConfig(
        loss=LossConfig(name=loss, top_k=8, chunk_size=16, **loss_kwargs),
        teacher=teacher_lib.TeacherConfig(mode=teacher_mode, ema_alpha=0.1),
        optim=OptimConfig(learning_rate=LR, schedule="constant", warmup_ratio=0.0, eps=EPS),
        total_steps=10,
    )


def lora_adapters_for_torch(model):
    """Our initial adapters in the torch reference's layout: {(layer, name): (A [in, r], B [r, out])}."""
    layers = model.layers
    out = {}
    for name in layers.lora.targets:
        a = np.asarray(getattr(layers, f"{name}_lora_a")[...])
        b = np.asarray(getattr(layers, f"{name}_lora_b")[...])
        for i in range(a.shape[0]):
            out[(i, name)] = (a[i].reshape(-1, a.shape[-1]), b[i].reshape(b.shape[1], -1))
    return {"scale": layers.lora.scale, "adapters": out}


@pytest.mark.parametrize("loss", ["topk", "full_kl"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_two_steps_match_torch(loss, use_lora, tiny_model_dir):
    from sdft_jax.bench.torch_step import TorchSDFTStep, TorchStepConfig

    path = tiny_model_dir("llama")
    lora = LoraConfig(rank=4, alpha=8.0) if use_lora else None
    # Attention in blocks of 4 queries (the library default is 128): the blocked path against torch's plain one.
    model = load_hf(path, lora=lora, query_block=4)
    cfg = step_config(loss)
    ref = TorchSDFTStep(path, TorchStepConfig(loss=loss, top_k=8, learning_rate=LR, eps=EPS, teacher="ema", ema_alpha=0.1),
                        lora=lora_adapters_for_torch(model) if use_lora else None)
    graphdef, state = init_train_state(model, cfg.optim)
    step = make_train_step(graphdef, state, cfg)
    for i in range(2):
        batch = random_batch(seed=i)
        state, metrics = step(state, shard_batch(batch, None))
        ref_loss = ref.step(batch)
        # full_kl is small (~4e-3) but sums terms of size ~log V, so fp32 leaves ~1e-7 absolute error.
        np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=2e-5, atol=1e-6, err_msg=f"step {i}")
    assert int(state.step) == 2 and int(metrics["skipped_nonfinite"]) == 0
    # Adam's first steps move every weight by about +-LR; a tolerance of 1% of LR checks the direction
    # and size of each element's update.
    if use_lora:
        ours = lora_adapters_for_torch(student_model(graphdef, state))["adapters"]
        for (layer, name), (a, b) in ours.items():
            mod = getattr(getattr(ref.model.model.layers[layer], "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"), name)
            np.testing.assert_allclose(a, mod.lora_a.detach().numpy(), atol=1e-2 * LR, err_msg=f"{layer} {name} A")
            np.testing.assert_allclose(b, mod.lora_b.detach().numpy(), atol=1e-2 * LR, err_msg=f"{layer} {name} B")
    else:
        ours = export_tensors(student_model(graphdef, state))
        theirs = {k: v.detach().numpy() for k, v in ref.model.state_dict().items()}
        for name, value in ours.items():
            np.testing.assert_allclose(value, theirs[name], atol=1e-2 * LR, err_msg=name)
        moved = np.abs(ours["model.layers.0.mlp.up_proj.weight"] - np.asarray(
            load_hf(path).layers.up_proj[...][0]).T).max()
        assert moved > 0.5 * LR  # the weights really moved


def test_sft_step_matches_torch(tiny_model_dir):
    from sdft_jax.bench.torch_step import TorchSDFTStep, TorchStepConfig

    path = tiny_model_dir("qwen2")
    cfg = StepConfig(loss=LossConfig(name="sft", chunk_size=16),
                     optim=OptimConfig(learning_rate=LR, schedule="constant", warmup_ratio=0.0), total_steps=10)
    rng = np.random.default_rng(5)
    batch = make_step_batch([rng.integers(3, 300, n).tolist() for n in (4, 7)], None,
                            [rng.integers(3, 300, n).tolist() for n in (6, 3)], pad_id=0)
    graphdef, state = init_train_state(load_hf(path), cfg.optim)
    state, metrics = make_train_step(graphdef, state, cfg)(state, shard_batch(batch, None))
    ref = TorchSDFTStep(path, TorchStepConfig(loss="sft", learning_rate=LR))
    np.testing.assert_allclose(float(metrics["loss"]), ref.step(batch), rtol=2e-5)


def test_nonfinite_loss_skips_the_update(tiny_model_dir):
    import dataclasses

    cfg = step_config("topk")
    graphdef, state = init_train_state(load_hf(tiny_model_dir("llama")), cfg.optim)
    poisoned = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.params)
    state = dataclasses.replace(state, params=poisoned)
    expected = jax.tree.map(np.asarray, (state.params, state.opt_state, state.teacher))
    new, metrics = make_train_step(graphdef, state, cfg)(state, shard_batch(random_batch(), None))
    assert int(metrics["skipped_nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    # Params, optimizer moments and teacher are exactly as before: nothing was trained on the NaN.
    got = (new.params, new.opt_state, new.teacher)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(new.step) == 1


def _run_steps(path, cfg, batch, mesh):
    # Attention in blocks of 4 queries (the default is 128): the blocks' slices of sharded activations.
    graphdef, state = init_train_state(load_hf(path, mesh=mesh, query_block=4), cfg.optim)
    step = make_train_step(graphdef, state, cfg, mesh=mesh)
    for _ in range(2):
        state, metrics = step(state, shard_batch(batch, mesh))
    return state, metrics


@pytest.fixture(scope="module")
def one_device_run(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    cfg, batch = step_config("topk"), random_batch(rows=8)
    return path, cfg, batch, _run_steps(path, cfg, batch, None)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_steps_equal_one_device(mesh_shape, one_device_run):
    path, cfg, batch, (single, m1) = one_device_run
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    sharded, m2 = _run_steps(path, cfg, batch, mesh)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    # Sharded reductions sum in another order: the same Adam conditioning as against torch (see EPS).
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2 * LR)
    # Really sharded as the rules say: q_proj is [layers, embed, q_heads, head_dim].
    q = jax.tree.leaves(sharded.params["layers"]["q_proj"])[0]
    data, fsdp, tensor = mesh_shape
    expected = (None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None, None)
    assert tuple(q.sharding.spec) + (None,) * (4 - len(q.sharding.spec)) == expected
    # Adam's moments and the teacher copy of q_proj are sharded like q_proj itself.
    copies = [x for x in jax.tree.leaves((sharded.opt_state, sharded.teacher)) if x.shape == q.shape]
    assert len(copies) == 3 and all(x.sharding.is_equivalent_to(q.sharding, q.ndim) for x in copies)
