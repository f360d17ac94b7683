"""The experiment's plan: every stage's trainer config, and bad experiment configs named by key."""

import pathlib
import runpy

import pytest

from sdft_jax.config import ConfigError
from sdft_jax.continual.plan import METHODS, make_plan

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "continual.py"


def continual_config(variant=""):
    get = runpy.run_path(str(CONFIG))["get_config"]
    return get(variant) if variant else get()


def test_default_plan_builds_both_stages_of_every_cell():
    c = continual_config()
    c.methods = "sft,sdft_topk,sdft_is"
    c.learning_rates = "5e-5,1e-4"
    c.seeds = "0,1"
    c.out_dir = "/exp"
    plan = make_plan(c)
    assert plan.eval_tasks == ("capitals", "elements", "probe")
    assert len(plan.runs) == 3 * 2 * 2 * 2
    for first, second in zip(plan.runs[::2], plan.runs[1::2]):
        assert (first.stage, second.stage) == (1, 2)
        assert (first.method, first.learning_rate, first.seed) == (second.method, second.learning_rate, second.seed)
        method, loss = METHODS[first.method]
        for run in (first, second):
            cfg = run.config
            assert (cfg.method, cfg.loss.name) == (method, loss)
            assert cfg.optim.learning_rate == run.learning_rate and cfg.seed == run.seed
            assert cfg.eval.tasks == "capitals,elements,probe" and not cfg.eval.at_start and cfg.eval.every == 0
            assert cfg.export and cfg.teacher_init_from == ""
        assert first.config.data.task == "capitals" and second.config.data.task == "elements"
        name = f"{first.method}_lr{first.learning_rate:g}_seed{first.seed}"
        assert first.config.run_dir == f"/exp/{name}/stage1" and second.config.run_dir == f"/exp/{name}/stage2"
        assert first.config.init_from == "" and second.config.init_from == f"/exp/{name}/stage1/export"
    assert plan.base_config.eval.tasks == "capitals,elements,probe"
    assert plan.base_dir == "/exp/base"


def test_stage2_teacher_from_the_base_model_and_own_step_count():
    c = continual_config()
    c.methods = "sft,sdft_full_kl"
    c.stage2_teacher = "base"
    c.stage2_steps = 7
    plan = make_plan(c)
    by_method = {(r.method, r.stage): r.config for r in plan.runs}
    assert by_method["sdft_full_kl", 2].teacher_init_from == "smollm2-135m"
    assert by_method["sdft_full_kl", 1].teacher_init_from == ""
    assert by_method["sft", 2].teacher_init_from == ""  # SFT has no teacher
    assert by_method["sft", 2].train.steps == 7 and by_method["sft", 1].train.steps == 48


def test_upstream_variant_needs_data_dir_then_plans_tool_use_then_science():
    c = continual_config("upstream")
    with pytest.raises(ConfigError, match="config.train.data.data_dir"):
        make_plan(c)
    c.train.data.data_dir = "/data/self-distillation"
    plan = make_plan(c)
    assert (plan.task_a, plan.task_b, plan.probe_tasks) == ("tooluse", "science", ())
    assert {r.method for r in plan.runs} == set(METHODS)
    assert plan.runs[0].config.eval.max_new_tokens == 0  # the tasks' own defaults (1024 / 2048)


@pytest.mark.parametrize("key, value, message", [
    ("methods", "sft,sdft_kl", "config.methods: unknown method 'sdft_kl'"),
    ("methods", "sft,sft", "config.methods lists a value twice"),
    ("methods", "", "config.methods is empty"),
    ("learning_rates", "1e-4,fast", "config.learning_rates: 'fast' is not a number"),
    ("learning_rates", "0", "config.learning_rates: learning rates must be > 0"),
    ("seeds", "0.5", "config.seeds: '0.5' is not an integer"),
    ("task_b", "capitals", "must be different tasks"),
    ("stage2_teacher", "student", r"config.stage2_teacher must be one of \['stage1', 'base'\]"),
    ("stage2_steps", -1, "config.stage2_steps"),
])
def test_bad_experiment_keys_are_named(key, value, message):
    c = continual_config()
    c[key] = value
    with pytest.raises(ConfigError, match=message):
        make_plan(c)


def test_bad_trainer_keys_are_named_under_train():
    c = continual_config()
    c.train.loss.top_k = 0
    with pytest.raises(ConfigError, match=r"config\.train\.loss\.top_k"):
        make_plan(c)
    c = continual_config().to_dict()
    c["train"]["optim"]["lr"] = 1.0
    with pytest.raises(ConfigError, match=r"unknown config key config\.train\.optim\.lr"):
        make_plan(c)
    c = continual_config().to_dict()
    c["methods_list"] = "sft"
    with pytest.raises(ConfigError, match=r"unknown config key config\.methods_list"):
        make_plan(c)


@pytest.mark.parametrize("stage2_teacher", ["stage1", "base"])
def test_lora_stage2_continues_stage1s_adapters_on_the_base(stage2_teacher):
    c = continual_config()
    c.out_dir = "/exp"
    c.methods = "sft,sdft_topk"
    c.stage2_teacher = stage2_teacher
    c.train.model.lora.rank = 8
    c.train.teacher.mode = "static"
    by_method = {(r.method, r.stage): r.config for r in make_plan(c).runs}
    for method in ("sft", "sdft_topk"):
        first, second = by_method[method, 1], by_method[method, 2]
        # Nothing merged: the same base model, and stage 1's adapters from its run directory.
        assert first.init_from == second.init_from == "" and second.model.name == first.model.name
        assert first.init_adapters_from == "" and second.init_adapters_from == f"/exp/{method}_lr5e-05_seed0/stage1"
        assert second.teacher_init_from == ""  # never a second copy of the base
    assert by_method["sdft_topk", 2].teacher.source == ("base" if stage2_teacher == "base" else "student")
    assert by_method["sdft_topk", 1].teacher.source == by_method["sft", 2].teacher.source == "student"


def test_lora_base_teacher_needs_a_static_teacher():
    c = continual_config()
    c.stage2_teacher = "base"
    c.train.model.lora.rank = 8  # the config's teacher is an EMA
    with pytest.raises(ConfigError, match=r"config\.stage2_teacher = 'base' with LoRA .*set "
                                          r"config\.train\.teacher\.mode = 'static' \(got 'ema'\)"):
        make_plan(c)
    c = continual_config()
    c.train.model.lora.rank = 8
    c.train.teacher.mode = "static"
    c.train.teacher.source = "base"
    with pytest.raises(ConfigError, match=r"config\.train\.teacher\.source = 'base': .*from config\.stage2_teacher"):
        make_plan(c)


def test_per_method_keys_and_stage2_steps_over_epochs():
    c = continual_config()
    c.methods = "sft,sdft_topk"
    c.per_method = {"sft": {"data": {"keep_system": True}, "optim": {"schedule": "linear"}}}
    c.train.train.steps = 0
    c.train.train.epochs = 1.0
    c.stage2_steps = 5
    by_method = {(r.method, r.stage): r.config for r in make_plan(c).runs}
    for stage in (1, 2):
        assert by_method["sft", stage].data.keep_system and by_method["sft", stage].optim.schedule == "linear"
        assert not by_method["sdft_topk", stage].data.keep_system
        assert by_method["sdft_topk", stage].optim.schedule == "constant"
    assert (by_method["sft", 1].train.steps, by_method["sft", 1].train.epochs) == (0, 1.0)
    assert (by_method["sft", 2].train.steps, by_method["sft", 2].train.epochs) == (5, 0.0)


@pytest.mark.parametrize("per_method, message", [
    ({"sdft": {}}, r"config\.per_method: unknown method 'sdft'"),
    ({"sft": {"data": {"keep_sytem": True}}}, r"unknown config key config\.per_method\.sft\.data\.keep_sytem"),
    ({"sft": {"seed": {"x": 1}}}, r"config\.per_method\.sft\.seed is not a section of config\.train"),
    ({"sft": {"data": {"keep_system": "yes"}}}, r"config\.train\.data\.keep_system must be true or false"),
])
def test_bad_per_method_keys_are_named(per_method, message):
    c = continual_config()
    c.per_method = per_method
    with pytest.raises(ConfigError, match=message):
        make_plan(c)


def _cells(plan):
    return [(r.method, r.learning_rate, r.seed) for r in plan.runs if r.stage == 1]


def test_sweep_variant_grids_per_method_then_repeats_the_chosen_settings():
    c = continual_config("sweep")
    c.out_dir = "/exp"
    plan = make_plan(c)
    assert plan.diagnose_teacher
    grid = [("sft", 5e-6, 0), ("sft", 1.5e-5, 0), ("sft", 5e-5, 0),
            ("sdft_topk", 5e-5, 0), ("sdft_topk", 1.5e-4, 0), ("sdft_topk", 5e-4, 0)]
    assert _cells(plan) == grid
    assert {r.config.train.steps for r in plan.runs} == {48}  # equal step counts, both stages, both methods
    assert [r.config.optim.learning_rate for r in plan.runs if r.stage == 2] == [lr for _, lr, _ in grid]
    # The repeat, on the same out_dir: the grid's cells first (finished: skipped), then the two new seeds.
    c.repeat_lr.sft, c.repeat_lr.sdft_topk = 1.5e-5, 5e-4
    plan = make_plan(c)
    assert _cells(plan) == grid + [("sft", 1.5e-5, 1), ("sft", 1.5e-5, 2), ("sdft_topk", 5e-4, 1),
                                   ("sdft_topk", 5e-4, 2)]
    assert plan.runs[-1].config.run_dir == "/exp/sdft_topk_lr0.0005_seed2/stage2"


def test_method_learning_rates_and_repeats_without_the_sweep_variant():
    c = continual_config()
    assert not make_plan(c).diagnose_teacher  # off by default
    c.methods, c.learning_rates, c.seeds = "sft,sdft_topk,sdft_is", "1e-4", "0,1"
    c.method_learning_rates = {"sdft_topk": "1e-4,3e-4", "sdft_full_kl": "1e-3"}  # a method not run: unused
    c.repeat_lr = {"sdft_topk": 3e-4}
    c.repeat_seeds = "1,2,3"  # seed 1 is in seeds already: only 2 and 3 are added
    assert _cells(make_plan(c)) == [("sft", 1e-4, 0), ("sft", 1e-4, 1), ("sdft_topk", 1e-4, 0), ("sdft_topk", 1e-4, 1),
                                    ("sdft_topk", 3e-4, 0), ("sdft_topk", 3e-4, 1), ("sdft_is", 1e-4, 0),
                                    ("sdft_is", 1e-4, 1), ("sdft_topk", 3e-4, 2), ("sdft_topk", 3e-4, 3)]


@pytest.mark.parametrize("key, value, message", [
    ("method_learning_rates", {"sdft": "1e-4"}, r"config\.method_learning_rates: unknown method 'sdft'"),
    ("method_learning_rates", {"sft": "1e-4,x"}, r"config\.method_learning_rates\.sft: 'x' is not a number"),
    ("repeat_lr", {"sft": 3e-5}, r"config\.repeat_lr\.sft = 3e-05 is not one of sft's learning rates \(5e-05\)"),
    ("repeat_lr", {"sft": "fast"}, r"config\.repeat_lr\.sft: 'fast' is not a number"),
    ("repeat_seeds", "", r"config\.repeat_seeds is empty"),
    ("diagnose_teacher", 1, r"config\.diagnose_teacher must be true or false"),
])
def test_bad_sweep_keys_are_named(key, value, message):
    c = continual_config().to_dict()
    c["repeat_lr"] = {"sft": 5e-5}
    c[key] = value
    with pytest.raises(ConfigError, match=message):
        make_plan(c)
