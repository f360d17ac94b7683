"""The recipe's continual-learning command: SFT vs SDFT, tool use then science, Qwen3.5-35B-A3B, LoRA 64.

    python -m tinker_cookbook.recipes.sdft.run_continual_learning model_name=Qwen/Qwen3.5-35B-A3B \\
        data_dir=Self-Distillation/data methods=sft,sdft_topk learning_rates=5e-4 stages=1,2 \\
        lora_rank=64 topk=20 thinking_format=true
becomes
    python -m sdft_jax.continual --config=configs/recipe/continual.py           # the command (lr 5e-4)
    python -m sdft_jax.continual --config=configs/recipe/continual.py:table     # the README's tables (3 LRs)
(on every worker of a v5p-64 slice, e.g. through launch/tpu.sh; the settings of each run are
configs/recipe/train_tooluse.py's, with the differences below). Stage 2 as the recipe: the LoRA adapter
continues from Stage 1 with a fresh optimizer, its teacher the original base model (adapters off).
"""

from ml_collections import ConfigDict

from sdft_jax.config import base_config

ATTENTION = "q_proj,k_proj,v_proj,o_proj,q_gate_proj"
LINEAR = "linear_q_proj,linear_k_proj,linear_v_proj,linear_z_proj,linear_out_proj"
SHARED = "shared_expert_gate_proj,shared_expert_up_proj,shared_expert_down_proj"
EXPERTS = "experts_gate_proj,experts_up_proj,experts_down_proj"


def get_config(variant: str = ""):
    c = ConfigDict()
    c.out_dir = "gs://BUCKET/runs/recipe-continual"
    c.task_a = "tooluse"  # README: "Stage 1: Train on tool-use"
    c.task_b = "science"  # README: "Stage 2: Train on science (from Stage 1 checkpoint)"
    c.probe_tasks = ""
    c.methods = "sft,sdft_topk"  # README: methods=sft,sdft_topk
    c.learning_rates = "5e-4"  # README: learning_rates=5e-4
    c.seeds = "0"
    c.stage2_teacher = "base"  # issue #18: the recipe's Stage-2 teacher is the original base model
    c.stage2_steps = 0  # train.epochs: one epoch of science
    # spec section 6 / issue #18: the recipe's SFT keeps the science system prompt and uses a linear
    # schedule; its SDFT drops the system turn
    c.per_method = ConfigDict({"sft": {"data": {"keep_system": True}, "optim": {"schedule": "linear"}}})
    c.compilation_cache = True

    t = c.train = base_config()
    t.model.name = "/mnt/models/qwen3.5-35b-a3b"  # README: model_name=Qwen/Qwen3.5-35B-A3B
    t.model.dtype = "bfloat16"
    t.model.param_dtype = "bfloat16"
    t.model.remat = "full"
    t.model.lora.rank = 64  # README: lora_rank=64
    t.model.lora.alpha = 32.0  # spec section 5
    t.model.lora.targets = f"{ATTENTION},{LINEAR},{SHARED},{EXPERTS}"  # Tinker's LoRA: every linear layer
    t.data.data_dir = "/mnt/data/self-distillation"  # README: data_dir=Self-Distillation/data
    t.data.thinking_format = True  # README: thinking_format=true (spec section 6's conversion)
    t.prompts.max_prompt_tokens = 2048
    t.rollout.max_new_tokens = 2048  # README: max_tokens default 2048
    t.prompts.max_target_tokens = 2048  # SFT targets: the same length limit
    t.loss.top_k = 20  # README: topk=20
    t.loss.reduction = "sum"  # spec section 3: the hosted recipe sums
    t.loss.chunk_size = 1024
    t.teacher.mode = "static"  # README: static teacher
    t.optim.learning_rate = 5e-4  # replaced by each value of learning_rates
    t.optim.b2 = 0.95  # spec section 5: the recipe's Adam beta2
    t.optim.schedule = "constant"  # SDFT; SFT: linear (per_method)
    t.optim.warmup_ratio = 0.0
    t.train.steps = 0
    t.train.epochs = 1.0  # issue #18: one epoch per stage
    t.train.prompts_per_step = 32  # README: groups_per_batch default 32 (the command does not pass it)
    t.train.micro_batch_size = 0  # 32 rows at once: configs/qwen3_5_35b_a3b.py's measured micro-batch
    t.eval.scoring = "recipe"  # the recipe's evaluators (docs/scoring.md)
    t.eval.batch_size = 64
    t.checkpoint.every = 25
    t.checkpoint.keep = 1
    t.mesh.data = 1
    t.mesh.fsdp = 4
    t.mesh.expert = 8
    t.mesh.tensor = 1
    if variant == "table":
        c.learning_rates = "1e-4,5e-4,1e-3"  # README: the tables' rows
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (table)")
    return c
