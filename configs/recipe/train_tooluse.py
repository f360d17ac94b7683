"""The recipe's single-task command: SDFT on tool use, Qwen3.5-35B-A3B, LoRA 64 (README "Single-task SDFT training").

    python -m tinker_cookbook.recipes.sdft.train model_name=Qwen/Qwen3.5-35B-A3B dataset=toolalpaca \\
        toolalpaca_data_path=Self-Distillation/data/tooluse_data/train_data groups_per_batch=128 \\
        learning_rate=5e-4 topk=20 lora_rank=64
becomes
    launch/tpu.sh train --config configs/recipe/train_tooluse.py --run-name recipe-tooluse \\
        --model-src gs://BUCKET/models/qwen3.5-35b-a3b --data-src gs://BUCKET/data

Every setting cites the recipe line it reproduces (README = ../shared/seed/sdft-recipe-readme.txt, spec =
docs of the method, ../shared/docs/sdft-spec.md). Hardware: a v5p-64 slice (32 chips), mesh fsdp=4 x expert=8,
as configs/qwen3_5_35b_a3b.py (whose memory plan this shares; prompts here may be 2048 tokens, not 1024:
re-run `python -m sdft_jax.bench plan` before a first run). docs/reproducing.md: what differs and why.
"""

from sdft_jax.config import base_config

ATTENTION = "q_proj,k_proj,v_proj,o_proj,q_gate_proj"
LINEAR = "linear_q_proj,linear_k_proj,linear_v_proj,linear_z_proj,linear_out_proj"
SHARED = "shared_expert_gate_proj,shared_expert_up_proj,shared_expert_down_proj"
EXPERTS = "experts_gate_proj,experts_up_proj,experts_down_proj"


def get_config():
    c = base_config()
    c.method = "sdft"
    c.run_dir = "gs://BUCKET/runs/recipe-tooluse"  # replaced by launch/tpu.sh (--run-name)
    c.model.name = "/mnt/models/qwen3.5-35b-a3b"  # README: model_name=Qwen/Qwen3.5-35B-A3B
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.lora.rank = 64  # README: lora_rank=64 ("64 for Qwen/Qwen3.5-35B-A3B")
    c.model.lora.alpha = 32.0  # spec section 5: LoRA alpha 32
    # Tinker's LoRA adapts every linear layer: attention, linear attention, shared and routed experts
    c.model.lora.targets = f"{ATTENTION},{LINEAR},{SHARED},{EXPERTS}"
    c.data.task = "tooluse"  # README: dataset=toolalpaca
    c.data.data_dir = "/mnt/data/self-distillation"  # README: toolalpaca_data_path=.../tooluse_data/train_data
    c.data.thinking_format = False  # README: thinking_format default false (not passed to this command)
    c.prompts.max_prompt_tokens = 2048  # the recipe cuts no prompt; tool-use prompts reach ~1,170 tokens
    c.rollout.max_new_tokens = 2048  # README: max_tokens default 2048
    c.rollout.temperature = 1.0  # spec section 2: sampled at temperature 1
    c.loss.name = "topk"  # README: topk=20, cross-entropy against the teacher's renormalised top-K
    c.loss.top_k = 20  # README: topk=20
    c.loss.reduction = "sum"  # spec section 3: the hosted recipe sums the per-token losses
    c.loss.skip_first_tokens = 3  # spec section 2: both references skip 3
    c.loss.chunk_size = 1024
    c.teacher.mode = "static"  # README: "Static teacher instead of EMA" (teacher_sync_every default None)
    c.optim.learning_rate = 5e-4  # README: learning_rate=5e-4
    c.optim.b1 = 0.9  # spec section 5: Adam beta1 0.9
    c.optim.b2 = 0.95  # spec section 5: "0.95 in the recipe"
    c.optim.schedule = "constant"  # the README names no schedule for SDFT (issue #18: only its SFT is linear)
    c.optim.warmup_ratio = 0.0
    c.train.steps = 0  # from epochs
    c.train.epochs = 1.0  # issue #18: "the recipe trains 1 epoch"
    c.train.prompts_per_step = 128  # README: groups_per_batch=128
    c.rollout.samples_per_prompt = 1  # one completion per problem (spec section 2 default)
    c.train.micro_batch_size = 32  # memory only (configs/qwen3_5_35b_a3b.py): the update is the 128-row step's
    c.eval.tasks = "tooluse,science"  # README results: tool use (new) and science (prior)
    c.eval.scoring = "recipe"  # the recipe's evaluators, quirks included (docs/scoring.md)
    c.eval.every = 0  # start and end, as the README's table
    c.eval.batch_size = 64
    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.mesh.data = 1
    c.mesh.fsdp = 4  # every weight's embed dimension split 4 ways
    c.mesh.expert = 8  # 32 of the 256 experts per chip
    c.mesh.tensor = 1
    return c
