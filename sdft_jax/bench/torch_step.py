"""The SDFT step written plainly with `transformers` torch: the reference for tests and benchmarks.

Same batch layout (`StepBatch`), same losses (dense), same AdamW with grad-norm clipping, same
teacher modes; LoRA as explicit low-rank modules on the HF linears and, for Qwen3-MoE, per-expert
adapters on the fused experts (`LoraExperts`); a MoE model's routers frozen unless asked, and its
load-balancing loss added when its config asks for it (`output_router_logits`), as ours does.
torch is a test/benchmark dependency only, so this lives under `bench/`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys

import numpy as np
import torch
import transformers

from sdft_jax.distill.batch import StepBatch
from sdft_jax.models import decoder, lora as lora_lib
from sdft_jax.models.config import ModelConfig

# Our projection -> the HF linear (path under the decoder layer) whose output holds it.
_LORA_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                 "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                 "down_proj": "mlp.down_proj",
                 # Qwen3.5's gated attention: q_proj's rows are, per head, hd query rows then hd gate rows.
                 "q_gate_proj": "self_attn.q_proj",
                 # Qwen3.5's Gated DeltaNet: in_proj_qkv's rows are those of q, then k, then v.
                 "linear_q_proj": "linear_attn.in_proj_qkv", "linear_k_proj": "linear_attn.in_proj_qkv",
                 "linear_v_proj": "linear_attn.in_proj_qkv", "linear_z_proj": "linear_attn.in_proj_z",
                 "linear_b_proj": "linear_attn.in_proj_b", "linear_a_proj": "linear_attn.in_proj_a",
                 "linear_out_proj": "linear_attn.out_proj",
                 "shared_expert_gate_proj": "mlp.shared_expert.gate_proj",
                 "shared_expert_up_proj": "mlp.shared_expert.up_proj",
                 "shared_expert_down_proj": "mlp.shared_expert.down_proj"}
EXPERT_PROJECTIONS = ("experts_gate_proj", "experts_up_proj", "experts_down_proj")
# Qwen3-MoE's and Qwen3.5-MoE's router (`Qwen3[_5]MoeTopKRouter.weight`, [E, D]); not Qwen3.5's
# `mlp.shared_expert_gate.weight`, which trains.
ROUTER_SUFFIX = "mlp.gate.weight"


def random_adapters(cfg: ModelConfig, lora: lora_lib.LoraConfig, seed: int = 0) -> dict:
    """Adapters of the projections our model adapts under `lora`, at our initialisation (A uniform in
    +-1/sqrt(fan-in), B zero), in the layout `TorchSDFTStep` takes: the same LoRA as ours without
    building our model (a benchmark's torch process)."""
    rng = np.random.default_rng(seed)
    layers = decoder.part_layers(cfg)
    adapters = {}
    for part, shapes in decoder.part_shapes(cfg).items():
        for name in [t for t in lora.targets if t in shapes]:
            a_shape, b_shape = lora_lib.adapter_shapes(name, shapes[name][0], lora.rank)
            n_in = lora_lib.PROJECTIONS[name]
            lead = 1 if name in lora_lib.EXPERT_PROJECTIONS else 0
            fan_in = int(np.prod(a_shape[lead:lead + n_in]))
            for layer in layers[part]:
                a = rng.uniform(-fan_in**-0.5, fan_in**-0.5, a_shape).astype(np.float32)
                b = np.zeros(b_shape, np.float32)
                if not lead:  # flattened: A [in, r], B [r, out]
                    a, b = a.reshape(-1, lora.rank), b.reshape(lora.rank, -1)
                adapters[(layer, name)] = (a, b)
    return {"scale": lora.scale, "adapters": adapters}


class LoraLinear(torch.nn.Module):
    """`base(x)` plus, for each adapter, `scale * (x @ A) @ B` added at its rows of the output, with
    A: [in, r], B: [r, out] (our layout, flattened). One adapter at every row is the plain LoRA linear;
    several at disjoint rows adapt a linear that HF fuses from several of our projections (Qwen3.5's
    q_proj: query and gate; in_proj_qkv: q, k and v)."""

    def __init__(self, base: torch.nn.Linear, adapters: dict, scale: float):
        """`adapters`: {our name: (A, B, rows)}; `rows` is a LongTensor of the output rows B's columns
        go to, or None for all of them in order."""
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = torch.nn.ParameterDict({n: torch.nn.Parameter(a.clone()) for n, (a, _, _) in adapters.items()})
        self.lora_b = torch.nn.ParameterDict({n: torch.nn.Parameter(b.clone()) for n, (_, b, _) in adapters.items()})
        self.rows = {n: rows for n, (_, _, rows) in adapters.items()}

    def forward(self, x):
        y = self.base(x)
        for name, a in self.lora_a.items():
            update = self.scale * (x @ a) @ self.lora_b[name]
            rows = self.rows[name]
            y = y + update if rows is None else y.index_add(-1, rows, update)
        return y


def _lora_rows(name: str, module: torch.nn.Module, config) -> torch.Tensor | None:
    """The output rows of HF linear `module` that our projection `name` is (None: all of them)."""
    if name in ("q_proj", "q_gate_proj"):
        heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None)
        head_dim = head_dim or config.hidden_size // heads
        if module.out_features != 2 * heads * head_dim:  # no output gate: q_proj is all rows
            return None
        offset = 0 if name == "q_proj" else head_dim
        return (torch.arange(heads)[:, None] * 2 * head_dim + offset + torch.arange(head_dim)).reshape(-1)
    if name in ("linear_q_proj", "linear_k_proj", "linear_v_proj"):
        key_dim = config.linear_num_key_heads * config.linear_key_head_dim
        value_dim = config.linear_num_value_heads * config.linear_value_head_dim
        start, size = {"linear_q_proj": (0, key_dim), "linear_k_proj": (key_dim, key_dim),
                       "linear_v_proj": (2 * key_dim, value_dim)}[name]
        return torch.arange(start, start + size)
    return None


class LoraExperts(torch.nn.Module):
    """HF's fused routed experts (`Qwen3MoeExperts`: `gate_up_proj` [E, 2F, D], gate rows first,
    `down_proj` [E, D, F]) as a plain loop over experts, with per-expert adapters in our layout added
    to each adapted projection: `scale * (x @ A[e]) @ B[e]`, A [E, in, r], B [E, r, out].

    Same call and weighting as `Qwen3MoeExperts.forward`: each expert's output times its routing weight,
    added to its tokens.
    """

    def __init__(self, base: torch.nn.Module, adapters: dict, scale: float):
        """`adapters`: {name in EXPERT_PROJECTIONS: (A, B) tensors}; projections not named have none."""
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = torch.nn.ParameterDict({n: torch.nn.Parameter(a.clone()) for n, (a, _) in adapters.items()})
        self.lora_b = torch.nn.ParameterDict({n: torch.nn.Parameter(b.clone()) for n, (_, b) in adapters.items()})

    def _project(self, x, w, name, e):
        y = x @ w.T
        if name in self.lora_a:
            y = y + self.scale * (x @ self.lora_a[name][e]) @ self.lora_b[name][e]
        return y

    def forward(self, hidden_states, top_k_index, top_k_weights):
        base = self.base
        F = base.gate_up_proj.shape[1] // 2
        out = torch.zeros_like(hidden_states)
        for e in range(base.gate_up_proj.shape[0]):
            token, slot = torch.where(top_k_index == e)
            if not len(token):
                continue
            x = hidden_states[token]
            gate = self._project(x, base.gate_up_proj[e, :F], "experts_gate_proj", e)
            up = self._project(x, base.gate_up_proj[e, F:], "experts_up_proj", e)
            y = self._project(base.act_fn(gate) * up, base.down_proj[e], "experts_down_proj", e)
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def recurrent_gated_delta_rule(query, key, value, g, beta, initial_state=None, output_final_state=False,
                               use_qk_l2norm_in_kernel=False, **_):
    """Gated DeltaNet as its per-token recurrence in the inputs' dtype: a drop-in for `transformers`'
    `torch_chunk_gated_delta_rule` (same arguments and results, [B, T, H, d] in and out), which computes
    in fp32 whatever its inputs; a float64 reference needs the recurrence in float64 too."""
    dtype = value.dtype
    if key.shape[2] != value.shape[2]:  # each q/k head serves consecutive value heads
        groups = value.shape[2] // key.shape[2]
        query, key = query.repeat_interleave(groups, dim=2), key.repeat_interleave(groups, dim=2)
    q, k, v, beta, g = (x.transpose(1, 2).to(dtype) for x in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:  # as transformers' l2norm (eps 1e-6, FLA's)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q = q * q.shape[-1] ** -0.5
    state = (torch.zeros(*v.shape[:2], k.shape[-1], v.shape[-1], dtype=dtype) if initial_state is None
             else initial_state.to(dtype))
    out = []
    for t in range(v.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        delta = (v[:, :, t] - (state * k[:, :, t, :, None]).sum(-2)) * beta[:, :, t, None]
        state = state + k[:, :, t, :, None] * delta[..., None, :]
        out.append((state * q[:, :, t, :, None]).sum(-2))
    return torch.stack(out, 2).transpose(1, 2), (state if output_final_state else None)


@contextlib.contextmanager
def _exact_delta_rule(model):
    """Inside: `model`'s Gated DeltaNet layers (Qwen3.5's) run `recurrent_gated_delta_rule` instead of
    transformers' fp32 chunked form (a module-level function of their modeling module)."""
    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")}
    saved = {m: m.torch_chunk_gated_delta_rule for m in modules}
    try:
        for m in modules:
            m.torch_chunk_gated_delta_rule = recurrent_gated_delta_rule
        yield
    finally:
        for m, f in saved.items():
            m.torch_chunk_gated_delta_rule = f


@dataclasses.dataclass
class TorchStepConfig:
    loss: str = "topk"  # topk | full_kl | sft
    top_k: int = 20
    skip_first_tokens: int = 3
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    teacher: str = "static"  # static | ema
    ema_alpha: float = 0.01
    train_router: bool = False  # full fine-tuning of a MoE model: train its routers too
    # The model's, the losses' and the optimizer's dtype. float64 makes this a reference for fp32 runs
    # of models whose torch fp32 path is itself inexact: transformers' fallback for Qwen3.5's chunked
    # Gated DeltaNet gives fp32 gradients ~10x further from float64's than ours. In float64 the Gated
    # DeltaNet runs as its per-token recurrence (`recurrent_gated_delta_rule`); transformers keeps a few
    # elementwise steps (norms, gates, softmax) in fp32.
    dtype: str = "float32"  # float32 | float64


def per_token_loss(cfg: TorchStepConfig, s_logits, t_logits, targets):
    """[B, C] per-token losses from [B, C, V] logits (in fp32, or float64 for float64 logits)."""
    at_least_fp32 = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # noqa: E731
    s_logp = torch.log_softmax(at_least_fp32(s_logits), -1)
    if cfg.loss == "sft":
        return -s_logp.gather(-1, targets[..., None])[..., 0]
    t_logits = at_least_fp32(t_logits)
    if cfg.loss == "topk":
        vals, ids = t_logits.topk(cfg.top_k, dim=-1)
        w = torch.log_softmax(vals, -1).exp()
        return -(w * s_logp.gather(-1, ids)).sum(-1)
    if cfg.loss == "full_kl":
        t_logp = torch.log_softmax(t_logits, -1)
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    raise ValueError(cfg.loss)


def sequence_mean(per_token, scored):
    counts = scored.sum(1)
    per_seq = (per_token * scored).sum(1) / counts.clamp(min=1)
    has = counts > 0
    return per_seq[has].mean() if has.any() else per_token.sum() * 0


class TorchSDFTStep:
    """Student, teacher and AdamW in torch; `step(batch)` runs one SDFT/SFT step and returns the loss
    (without the weighted load-balancing loss, which it adds to what it differentiates and keeps in
    `last_aux_loss`)."""

    def __init__(self, model_dir: str, cfg: TorchStepConfig, lora: dict | None = None):
        """`lora`: {"scale": s, "adapters": {(layer, module): (A [in, r], B [r, out]) numpy}} or None;
        `layer` is the global layer index, and a routed experts' projection (`EXPERT_PROJECTIONS`) has
        per-expert adapters, A [E, in, r] and B [E, r, out]."""
        self.cfg = cfg
        dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        # The routed experts as their plain per-expert loop ("eager"): torch's grouped matmul has no float64.
        extra = {"experts_implementation": "eager"} if cfg.dtype == "float64" else {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **extra)
        self.model.train()
        config = self.model.config
        self.balance_coef = config.router_aux_loss_coef if getattr(config, "output_router_logits", False) else 0.0
        self.lora = lora is not None
        if lora is not None:
            for p in self.model.parameters():
                p.requires_grad_(False)
            experts: dict[int, dict] = {}
            linears: dict[tuple[int, str], dict] = {}
            for (layer, name), (a, b) in lora["adapters"].items():
                if name in EXPERT_PROJECTIONS:
                    experts.setdefault(layer, {})[name] = (torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
                else:
                    linears.setdefault((layer, _LORA_MODULES[name]), {})[name] = (torch.tensor(a, dtype=dtype),
                                                                                    torch.tensor(b, dtype=dtype))
            for (layer, path), adapters in linears.items():
                parent_path, attr = path.rsplit(".", 1)
                parent = self.model.model.layers[layer].get_submodule(parent_path)
                base = getattr(parent, attr)
                with_rows = {n: (a, b, _lora_rows(n, base, config)) for n, (a, b) in adapters.items()}
                setattr(parent, attr, LoraLinear(base, with_rows, lora["scale"]))
            for layer, adapters in experts.items():
                mlp = self.model.model.layers[layer].mlp
                mlp.experts = LoraExperts(mlp.experts, adapters, lora["scale"])
        elif not cfg.train_router:
            for name, p in self.model.named_parameters():
                if name.endswith(ROUTER_SUFFIX):
                    p.requires_grad_(False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.teacher = copy.deepcopy(self.model).eval() if cfg.loss != "sft" else None
        for p in (self.teacher.parameters() if self.teacher is not None else []):
            p.requires_grad_(False)
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                                     weight_decay=0.0)

    def adapter(self, layer: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The current (A, B) of our projection `name` in global layer `layer`, in the layout given."""
        block = self.model.model.layers[layer]
        module = block.mlp.experts if name in EXPERT_PROJECTIONS else block.get_submodule(_LORA_MODULES[name])
        return module.lora_a[name].detach().numpy(), module.lora_b[name].detach().numpy()

    def _forward(self, model, tokens, mask, router_logits=False):
        tokens, mask = torch.tensor(np.asarray(tokens)).long(), torch.tensor(np.asarray(mask))
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        kwargs = {"output_router_logits": True} if router_logits else {}
        exact = _exact_delta_rule(model) if self.cfg.dtype == "float64" else contextlib.nullcontext()
        with exact:
            return model.model(input_ids=tokens, attention_mask=mask.long(), position_ids=positions, **kwargs)

    def _hidden(self, model, tokens, mask):
        return self._forward(model, tokens, mask).last_hidden_state

    def router_logits(self, tokens, mask) -> tuple[torch.Tensor, ...]:
        """The student's router logits per sparse layer, each [B*L, E] (no gradient)."""
        with torch.no_grad():
            return self._forward(self.model, tokens, mask, router_logits=True).router_logits

    def _balance_loss(self, out, mask):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

        config = self.model.config
        return load_balancing_loss_func(out.router_logits, config.num_experts, config.num_experts_per_tok,
                                        torch.tensor(np.asarray(mask)).long())

    def step(self, batch: StepBatch) -> float:
        cfg = self.cfg
        C = batch.completion_len
        targets = torch.tensor(np.asarray(batch.completion_tokens)).long()
        mask = torch.tensor(np.asarray(batch.completion_mask))
        t_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                h = self._hidden(self.teacher, batch.teacher_tokens, batch.teacher_mask)
                p = batch.teacher_prompt_len
                t_logits = self.teacher.lm_head(h[:, p - 1: p - 1 + C])
        out = self._forward(self.model, batch.student_tokens, batch.student_mask, router_logits=self.balance_coef > 0)
        h = out.last_hidden_state
        p = batch.student_prompt_len
        s_logits = self.model.lm_head(h[:, p - 1: p - 1 + C])
        scored = mask.clone()
        if cfg.loss != "sft":
            scored[:, : cfg.skip_first_tokens] = False
        loss = sequence_mean(per_token_loss(cfg, s_logits, t_logits, targets), scored.float())
        distill_loss = float(loss.detach())
        self.last_aux_loss = 0.0
        if self.balance_coef > 0:
            aux = self.balance_coef * self._balance_loss(out, batch.student_mask)
            self.last_aux_loss = float(aux.detach())
            loss = loss + aux
        self.opt.zero_grad()
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.opt.step()
        if self.teacher is not None and cfg.teacher == "ema":
            with torch.no_grad():
                for (_, t), (_, s) in zip(self.teacher.named_parameters(), self.model.named_parameters()):
                    if s.requires_grad:
                        t.mul_(1 - cfg.ema_alpha).add_(cfg.ema_alpha * s)
        return distill_loss
