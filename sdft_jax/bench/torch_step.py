"""The SDFT step written plainly with `transformers` torch: the reference for tests and benchmarks.

Same batch layout (`StepBatch`), same losses (dense), same AdamW with grad-norm clipping, same
teacher modes; LoRA as explicit low-rank modules on the HF linears and, for Qwen3-MoE, per-expert
adapters on the fused experts (`LoraExperts`); a MoE model's routers frozen unless asked, and its
load-balancing loss added when its config asks for it (`output_router_logits`), as ours does.
torch is a test/benchmark dependency only, so this lives under `bench/`.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
import transformers

from sdft_jax.distill.batch import StepBatch

_LORA_MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
EXPERT_PROJECTIONS = ("experts_gate_proj", "experts_up_proj", "experts_down_proj")
ROUTER_SUFFIX = "mlp.gate.weight"  # Qwen3-MoE's router (`Qwen3MoeTopKRouter.weight`, [E, D])


class LoraLinear(torch.nn.Module):
    """`base(x) + scale * (x @ A) @ B` with A: [in, r], B: [r, out] (our layout, flattened)."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.lora_a = torch.nn.Parameter(a.clone())
        self.lora_b = torch.nn.Parameter(b.clone())

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a) @ self.lora_b


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


def per_token_loss(cfg: TorchStepConfig, s_logits, t_logits, targets):
    """[B, C] per-token losses from [B, C, V] logits (fp32)."""
    s_logp = torch.log_softmax(s_logits.float(), -1)
    if cfg.loss == "sft":
        return -s_logp.gather(-1, targets[..., None])[..., 0]
    t_logits = t_logits.float()
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
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.model.train()
        config = self.model.config
        self.balance_coef = config.router_aux_loss_coef if getattr(config, "output_router_logits", False) else 0.0
        self.lora = lora is not None
        if lora is not None:
            for p in self.model.parameters():
                p.requires_grad_(False)
            experts: dict[int, dict] = {}
            for (layer, name), (a, b) in lora["adapters"].items():
                if name in EXPERT_PROJECTIONS:
                    experts.setdefault(layer, {})[name] = (torch.tensor(a), torch.tensor(b))
                    continue
                parent = getattr(self.model.model.layers[layer], _LORA_MODULES[name])
                setattr(parent, name, LoraLinear(getattr(parent, name), torch.tensor(a), torch.tensor(b),
                                                 lora["scale"]))
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

    def _forward(self, model, tokens, mask, router_logits=False):
        tokens, mask = torch.tensor(np.asarray(tokens)).long(), torch.tensor(np.asarray(mask))
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        kwargs = {"output_router_logits": True} if router_logits else {}
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
