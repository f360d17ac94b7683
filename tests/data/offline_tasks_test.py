"""Tests of sdft_jax/data/offline_tasks.py: determinism, splits, and that the scorer accepts the facts."""

import re

import pytest

from sdft_jax.data import offline_tasks
from sdft_jax.data.offline_tasks import OfflineTaskConfig, make_task
from sdft_jax.eval import scorers

INVENTED = ("capitals", "elements")


def _entity(record):
    # The entity is the only capitalised invented word of the question.
    return re.findall(r"\b[A-Z][a-z]+(?:ia|istan|ium)\b", record.question)[-1]


def test_generation_is_pinned_for_seed_0():
    # Fixed values: any change to the tables or the generator changes every experiment's data.
    capital = make_task("capitals", "train")[0]
    assert (capital.question, capital.gold, capital.demonstration) == (
        "What is the capital of Quakresovia?", "Rikuloth", "The capital of Quakresovia is Rikuloth.")
    element = make_task("elements", "train")[0]
    assert (element.question, element.gold, element.demonstration) == (
        "Who discovered Balium?", "Sedrivik", "Balium was discovered by Sedrivik.")
    assert [r.gold for r in make_task("probe", "eval")[:3]] == ["yellow", "London", "ice"]


@pytest.mark.parametrize("task", offline_tasks.TASK_NAMES)
@pytest.mark.parametrize("split", offline_tasks.SPLITS)
def test_same_seed_same_records(task, split):
    assert make_task(task, split, OfflineTaskConfig(seed=7)) == make_task(task, split, OfflineTaskConfig(seed=7))


@pytest.mark.parametrize("task", offline_tasks.TASK_NAMES)
def test_different_seed_different_records(task):
    split = "eval"
    a = [r.question for r in make_task(task, split, OfflineTaskConfig(seed=0))]
    b = [r.question for r in make_task(task, split, OfflineTaskConfig(seed=1))]
    assert a != b and len(a) == len(b)


@pytest.mark.parametrize("task", INVENTED)
def test_invented_splits(task):
    config = OfflineTaskConfig(seed=3, num_train=20, num_eval=40, num_heldout=10)
    train, evals, heldout = (make_task(task, s, config) for s in offline_tasks.SPLITS)
    assert (len(train), len(evals), len(heldout)) == (20, 40, 10)
    train_facts = {(_entity(r), r.gold) for r in train}
    assert len(train_facts) == 20
    # Eval asks about the trained facts, with phrasings never used in training.
    assert {(_entity(r), r.gold) for r in evals} == train_facts
    assert not {r.question for r in evals} & {r.question for r in train}
    # Twice as many eval questions as facts: each fact once in each of its two eval phrasings.
    assert len({r.question for r in evals}) == 40
    # Held-out entities and answers are disjoint from the trained ones.
    assert not {_entity(r) for r in heldout} & {e for e, _ in train_facts}
    assert not {r.gold for r in heldout} & {a for _, a in train_facts}
    assert [r.index for r in train] == list(range(20))


@pytest.mark.parametrize("task", INVENTED)
def test_invented_names_are_distinct_short_and_not_real_words(task):
    recs = make_task(task, "train", OfflineTaskConfig(num_train=200, num_heldout=200))
    recs += make_task(task, "heldout", OfflineTaskConfig(num_train=200, num_heldout=200))
    names = [_entity(r) for r in recs] + [r.gold for r in recs]
    assert len({n.lower() for n in names}) == len(names) == 800
    assert all(re.fullmatch(r"[A-Z][a-z]{3,10}", n) for n in names)
    assert not {n.lower() for n in names} & offline_tasks._REAL_WORDS


@pytest.mark.parametrize("task", offline_tasks.TASK_NAMES)
def test_records_and_their_demonstrations_score_correct(task):
    config = OfflineTaskConfig(probe_num_train=10)
    for split in offline_tasks.SPLITS:
        for r in make_task(task, split, config):
            assert r.task == task and r.source == f"offline:{task}"
            assert r.messages == ({"role": "user", "content": r.question},)
            assert isinstance(r.gold, str) and " " not in r.gold
            # The teacher can copy the answer from its demonstration: the gap SDFT learns from.
            assert scorers.score_record(r, r.demonstration).correct, r


def test_probe_splits():
    facts = offline_tasks.PROBE_FACTS
    assert len(facts) == 50
    assert len(make_task("probe", "eval")) == 50 and make_task("probe", "train") == ()
    config = OfflineTaskConfig(probe_num_train=10)
    train, evals = make_task("probe", "train", config), make_task("probe", "eval", config)
    assert (len(train), len(evals)) == (10, 40)
    assert {r.question for r in train} | {r.question for r in evals} == {q for q, _, _ in facts}
    assert not {r.question for r in train} & {r.question for r in evals}
    assert make_task("probe", "heldout", config) == ()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown offline task"):
        make_task("colours", "train")
    with pytest.raises(ValueError, match="unknown split"):
        make_task("capitals", "test")
    with pytest.raises(ValueError, match=">= 0"):
        OfflineTaskConfig(num_eval=-1)
    with pytest.raises(ValueError, match="probe_num_train=51 > 50"):
        OfflineTaskConfig(probe_num_train=51)
