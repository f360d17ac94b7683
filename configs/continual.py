"""The continual-learning experiment (spec section 8): learn task A, then task B, and measure what is kept.

    python -m sdft_jax.continual --config=configs/continual.py                # CPU scale, offline tasks
    python -m sdft_jax.continual --config=configs/continual.py:sweep          # issue #21's LR sweep (~2.5 h)
    python -m sdft_jax.continual --config=configs/continual.py:upstream \\
        --config.train.data.data_dir=/path/to/data --config.train.model.name=/path/to/Qwen2.5-7B-Instruct \\
        --config.methods=sft,sdft_topk --config.learning_rates=1e-5,2e-5

Default: SmolLM2-135M-Instruct on 2 CPU cores; A = invented capitals, B = invented chemical elements'
discoverers, P = probe of facts the base model already knows (evaluated at every point, so forgetting
of prior knowledge shows as well as forgetting of A). The training settings are the demo's (see
configs/demo.py for why each differs from the spec's defaults).
`:upstream`: tool use then science on the upstream data layout (`data_dir` holds tooluse_data/ and
science_data/), the official recipe's settings, for accelerators.
`:sweep`: the learning-vs-retention frontier at CPU scale (issue #21): SFT and SDFT top-K, 3 learning
rates each at equal step counts, the teacher diagnostics on; then the best LR of each with 2 more seeds
(`--config.repeat_lr.sft=... --config.repeat_lr.sdft_topk=...`, the same out_dir: the grid is skipped).
docs/results/continual_cpu_sweep.md has the commands, the time they took and the results.
The experiment's own keys are below; the trainer's keys live under `train` (see sdft_jax/config.py).
Results of this config: docs/results/continual_cpu.md.
"""

from sdft_jax.config import base_config
from sdft_jax.continual.plan import METHODS


def get_config(variant: str = ""):
    from ml_collections import ConfigDict

    c = ConfigDict()
    c.out_dir = "runs/continual"  # base/, <method>_lr<lr>_seed<seed>/stage{1,2}/, results.{csv,md,png}
    c.task_a = "capitals"  # stage 1's task
    c.task_b = "elements"  # stage 2's task
    c.probe_tasks = "probe"  # also evaluated at every point (comma-separated; may be empty)
    c.methods = "sft,sdft_topk,sdft_full_kl"  # any of sft, sdft_topk, sdft_full_kl, sdft_reverse, sdft_is
    c.learning_rates = "5e-5"  # comma-separated grid
    c.seeds = "0"  # comma-separated; repeated seeds estimate run-to-run noise
    # stage 2's teacher: stage1 = the student as stage 2 starts | base = the original base model (the recipe's;
    # with LoRA the student's base with the adapters off, which needs train.teacher.mode = "static")
    c.stage2_teacher = "stage1"
    c.stage2_steps = 0  # 0 = train.steps (or train.epochs)
    # a method's own grid, e.g. --config.method_learning_rates.sft=5e-6,1.5e-5 ("" = learning_rates)
    c.method_learning_rates = ConfigDict({m: "" for m in METHODS})
    # one learning rate of a method repeated with repeat_seeds after the grid (0 = none)
    c.repeat_lr = ConfigDict({m: 0.0 for m in METHODS})
    c.repeat_seeds = "1,2"
    # before stage 2: task B's accuracy with the demonstration in the prompt, the stage-1 student and the base
    # model as teacher (<cell>/stage2/teacher_eval/, base/teacher_eval/); one greedy eval of task B each
    c.diagnose_teacher = False
    # trainer keys that differ by method, e.g. {"sft": {"data": {"keep_system": True}}}
    c.per_method = ConfigDict()
    c.compilation_cache = True  # persistent XLA cache under out_dir: every stage compiles the same programs

    t = c.train = base_config()
    t.model.name = "smollm2-135m"
    t.model.dtype = "float32"
    t.model.remat = "full"
    t.data.offline_num_train = 8
    t.prompts.max_prompt_tokens = 256
    t.prompts.teacher_template = (
        "{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own."
    )
    t.rollout.max_new_tokens = 32
    t.loss.top_k = 20
    t.loss.skip_first_tokens = 0
    t.teacher.mode = "ema"
    t.teacher.ema_alpha = 0.01
    t.optim.learning_rate = 5e-5  # replaced by each value of learning_rates
    t.optim.schedule = "constant"
    t.optim.warmup_ratio = 0.0
    t.train.steps = 48
    t.train.prompts_per_step = 8
    t.eval.limit = 32
    t.eval.max_new_tokens = 32
    t.checkpoint.every = 16
    t.checkpoint.keep = 1
    t.mesh.data = -1

    if variant == "upstream":
        c.out_dir = "runs/continual_upstream"
        c.task_a, c.task_b, c.probe_tasks = "tooluse", "science", ""
        c.methods = "sft,sdft_topk,sdft_full_kl,sdft_reverse,sdft_is"
        c.learning_rates = "1e-5,2e-5"
        # the recipe's SFT trains with the science system prompt, its SDFT without
        c.per_method = ConfigDict({"sft": {"data": {"keep_system": True}}})
        t.model.name = "smollm2-135m"  # set to a real instruct model directory
        t.model.dtype = "bfloat16"
        t.model.param_dtype = "bfloat16"
        t.data.data_dir = ""  # required: the folder holding tooluse_data/ and science_data/
        t.prompts.max_prompt_tokens = 2048
        t.prompts.teacher_template = base_config().prompts.teacher_template
        t.rollout.max_new_tokens = 1024
        t.loss.skip_first_tokens = 3
        t.loss.chunk_size = 1024
        t.optim.schedule = "cosine"
        t.optim.warmup_ratio = 0.1
        t.train.steps = 200
        t.train.prompts_per_step = 32
        t.eval.limit = 0
        t.eval.max_new_tokens = 0  # the tasks' defaults: tool use 1024, science 2048
        t.checkpoint.every = 50
        t.checkpoint.keep = 2
    elif variant == "sweep":
        # issue #21. SFT: from an LR that keeps A (and may learn B slowly) to the one that learned B and erased
        # A (5e-5, docs/results/continual_cpu.md); SDFT top-K: from that 5e-5, which kept A and learned B to
        # 6%, up a decade. Every stage 48 steps of 8 prompts for both methods (equal step counts).
        c.out_dir = "runs/continual_sweep"
        c.methods = "sft,sdft_topk"
        c.method_learning_rates.sft = "5e-6,1.5e-5,5e-5"
        c.method_learning_rates.sdft_topk = "5e-5,1.5e-4,5e-4"
        c.diagnose_teacher = True
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (upstream, sweep)")
    return c
