"""Invented-fact tasks for CPU-scale SDFT experiments with a small model (e.g. SmolLM2-135M-Instruct).

SDFT learns from the gap between the student (question alone) and the teacher (question plus the
demonstration in context). Invented facts make that gap large and known: no model has seen them, yet
any instruct model can copy a one-word answer from its context. Questions are short and answers are
one invented word.

Tasks:
  "capitals"  (A): capitals of invented countries. "What is the capital of Zorbania?" -> "Velmora".
  "elements"  (B): discoverers of invented elements. "Who discovered Drevium?" -> "Halbrek".
  "probe"     (P): easy real facts a small instruct model already answers (capitals, colours, counts,
                   sums); a held-out check that training on A or B does not erase what the model knew.

Splits (a decision worth knowing: invented facts cannot be inferred, so evaluating knowledge
acquisition on unseen entities would measure nothing):
  "train":   the facts to learn, one phrasing per fact.
  "eval":    the same facts asked with held-out phrasings: did the model learn them?
  "heldout": facts about entities never trained on: must stay near 0 (a guard against a scorer or
             model that guesses); disjoint in entities from "train" and "eval".
"probe" has "train" (`probe_num_train` facts, none by default; e.g. for a replay or debugging set) and
"eval" (all other facts), disjoint; its "heldout" is empty.

Generation is deterministic for a seed on every machine: `random.Random` seeded with an integer or
string (never `hash()`), over fixed syllable tables.
"""

from __future__ import annotations

import dataclasses
import random

from sdft_jax.data.records import Record
from sdft_jax.validation import check_int

TASK_NAMES = ("capitals", "elements", "probe")
SPLITS = ("train", "eval", "heldout")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "tr", "th", "sh", "qu")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "l", "s")
_COUNTRY_ENDINGS = ("ania", "ovia", "aria", "istan", "onia", "eria")
_CITY_ENDINGS = ("ora", "ith", "enne", "oth", "mar")
_ELEMENT_ENDING = "ium"
_SURNAME_ENDINGS = ("ek", "ov", "vik", "quist", "ardt")

# Real words these tables can spell: an "invented" fact about a real place or element would not be
# unknown to the model. (Two-syllable stems plus these endings; checked case-insensitively.)
_REAL_WORDS = frozenset("""
    albania romania tasmania tanzania lithuania mauritania bavaria malaria samaria pakistan kurdistan
    afghanistan turkmenistan macedonia begonia polonia laconia valeria nigeria liberia siberia segovia
    thorium sodium radium podium medium tedium stadium lithium gallium thulium fermium thallium barium
    terbium samarium selenium titanium vanadium polonium plutonium neptunium magnesium potassium
    rubidium palladium germanium tellurium lutetium nobelium europium francium americium
    pandora senora angora dora nora flora judith meredith dagmar popov petrov pavlov
""".split())

# Every question asks for one word; the train phrasing and the held-out eval phrasings differ.
_TEMPLATES = {
    "capitals": {
        "train": ("What is the capital of {entity}?",),
        "eval": ("Which city is the capital of {entity}?", "Name the capital city of {entity}."),
        "demonstration": "The capital of {entity} is {answer}.",
    },
    "elements": {
        "train": ("Who discovered {entity}?",),
        "eval": ("Which scientist discovered the element {entity}?", "Name the discoverer of {entity}."),
        "demonstration": "{entity} was discovered by {answer}.",
    },
}

# (question, answer, demonstration): facts SmolLM2-135M-Instruct-sized models answer reliably.
PROBE_FACTS = (
    ("What is the capital of France?", "Paris", "The capital of France is Paris."),
    ("What is the capital of Japan?", "Tokyo", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "Rome", "The capital of Italy is Rome."),
    ("What is the capital of Germany?", "Berlin", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "Madrid", "The capital of Spain is Madrid."),
    ("What is the capital of England?", "London", "The capital of England is London."),
    ("What is the capital of Russia?", "Moscow", "The capital of Russia is Moscow."),
    ("What is the capital of China?", "Beijing", "The capital of China is Beijing."),
    ("What is the capital of Egypt?", "Cairo", "The capital of Egypt is Cairo."),
    ("What is the capital of Greece?", "Athens", "The capital of Greece is Athens."),
    ("What is the capital of Ireland?", "Dublin", "The capital of Ireland is Dublin."),
    ("What is the capital of Portugal?", "Lisbon", "The capital of Portugal is Lisbon."),
    ("What is the capital of Austria?", "Vienna", "The capital of Austria is Vienna."),
    ("What is the capital of Norway?", "Oslo", "The capital of Norway is Oslo."),
    ("What is the capital of Canada?", "Ottawa", "The capital of Canada is Ottawa."),
    ("What colour is the sky on a clear day?", "blue", "The sky on a clear day is blue."),
    ("What colour is grass?", "green", "Grass is green."),
    ("What colour is snow?", "white", "Snow is white."),
    ("What colour is a ripe banana?", "yellow", "A ripe banana is yellow."),
    ("What colour is coal?", "black", "Coal is black."),
    ("What colour is blood?", "red", "Blood is red."),
    ("What colour is a carrot?", "orange", "A carrot is orange."),
    ("What colour is a lemon?", "yellow", "A lemon is yellow."),
    ("What colour is milk?", "white", "Milk is white."),
    ("What colour is a ripe tomato?", "red", "A ripe tomato is red."),
    ("How many legs does a dog have?", "4", "A dog has 4 legs."),
    ("How many legs does a spider have?", "8", "A spider has 8 legs."),
    ("How many days are in a week?", "7", "There are 7 days in a week."),
    ("How many months are in a year?", "12", "There are 12 months in a year."),
    ("How many hours are in a day?", "24", "There are 24 hours in a day."),
    ("How many sides does a triangle have?", "3", "A triangle has 3 sides."),
    ("How many sides does a square have?", "4", "A square has 4 sides."),
    ("How many wheels does a bicycle have?", "2", "A bicycle has 2 wheels."),
    ("How many minutes are in an hour?", "60", "There are 60 minutes in an hour."),
    ("What is 2 + 2?", "4", "2 + 2 = 4."),
    ("What is 3 + 5?", "8", "3 + 5 = 8."),
    ("What is 10 - 4?", "6", "10 - 4 = 6."),
    ("What is 6 + 3?", "9", "6 + 3 = 9."),
    ("What is 7 + 7?", "14", "7 + 7 = 14."),
    ("What is 5 x 2?", "10", "5 x 2 = 10."),
    ("What is the opposite of hot?", "cold", "The opposite of hot is cold."),
    ("What is the opposite of up?", "down", "The opposite of up is down."),
    ("What is the opposite of day?", "night", "The opposite of day is night."),
    ("What is the opposite of big?", "small", "The opposite of big is small."),
    ("What animal says moo?", "cow", "A cow says moo."),
    ("What animal barks?", "dog", "A dog barks."),
    ("What is frozen water called?", "ice", "Frozen water is called ice."),
    ("Which planet do we live on?", "Earth", "We live on planet Earth."),
    ("What star is at the centre of our solar system?", "Sun", "The Sun is at the centre of our solar system."),
    ("What is the largest ocean on Earth?", "Pacific", "The largest ocean on Earth is the Pacific."),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineTaskConfig:
    """Split sizes of the offline tasks; `seed` fixes every name and the order of the probe facts.

    Attributes:
      seed: the generator's seed.
      num_train: invented facts to learn (one question each).
      num_eval: eval questions over the trained facts (cycling through facts and phrasings).
      num_heldout: invented facts never trained on.
      probe_num_train: probe facts put in the probe's "train" split; the rest form its "eval" split.
    """

    seed: int = 0
    num_train: int = 64
    num_eval: int = 64
    num_heldout: int = 32
    probe_num_train: int = 0

    def __post_init__(self):
        name = type(self).__name__
        check_int(f"{name}.seed", self.seed)
        for size in ("num_train", "num_eval", "num_heldout", "probe_num_train"):
            check_int(f"{name}.{size}", getattr(self, size), minimum=0)
        if self.probe_num_train > len(PROBE_FACTS):
            raise ValueError(f"{name}.probe_num_train={self.probe_num_train} > {len(PROBE_FACTS)} probe facts")


def _word(rng: random.Random, syllables: int, ending: str) -> str:
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    if stem[-1] in _VOWELS and ending[:1] in _VOWELS:
        stem = stem[:-1]  # "Tatro" + "ium" reads better as "Tatrium"
    return (stem + ending).capitalize()


def _unique_names(rng: random.Random, count: int, endings: tuple[str, ...], taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        name = _word(rng, 2, rng.choice(endings))
        # Names are distinct case-insensitively, so no answer is also another item's entity or answer.
        key = name.lower()
        if key not in taken and key not in _REAL_WORDS and len(name) <= 11:
            taken.add(key)
            names.append(name)
    return names


def _invented_facts(task: str, seed: int, count: int) -> list[tuple[str, str]]:
    """`count` (entity, answer) pairs for `task`, all names distinct."""
    rng = random.Random(f"sdft-jax/offline/{task}/{seed}")
    taken: set[str] = set()
    if task == "capitals":
        entities = _unique_names(rng, count, _COUNTRY_ENDINGS, taken)
        answers = _unique_names(rng, count, _CITY_ENDINGS, taken)
    else:
        entities = _unique_names(rng, count, (_ELEMENT_ENDING,), taken)
        answers = _unique_names(rng, count, _SURNAME_ENDINGS, taken)
    return list(zip(entities, answers))


def _record(task: str, index: int, question: str, answer: str, demonstration: str) -> Record:
    return Record(task=task, index=index, source=f"offline:{task}", messages=({"role": "user", "content": question},),
                  demonstration=demonstration, gold=answer)


def make_task(task: str, split: str, config: OfflineTaskConfig = OfflineTaskConfig()) -> tuple[Record, ...]:
    """Records of one split of an offline task (see the module docstring for tasks and splits).

    Every record carries its demonstration (also eval items: the teacher's accuracy needs it) and the
    answer string as gold.
    """
    if task not in TASK_NAMES:
        raise ValueError(f"unknown offline task {task!r}; expected one of {TASK_NAMES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if task == "probe":
        return _probe(split, config)
    facts = _invented_facts(task, config.seed, config.num_train + config.num_heldout)
    templates = _TEMPLATES[task]
    demo = templates["demonstration"]
    trained = facts[:config.num_train]
    out = []
    if split == "heldout":
        for i, (entity, answer) in enumerate(facts[config.num_train:]):
            question = templates["train"][0].format(entity=entity)
            out.append(_record(task, i, question, answer, demo.format(entity=entity, answer=answer)))
    elif split == "train":
        for i, (entity, answer) in enumerate(trained):
            question = templates["train"][0].format(entity=entity)
            out.append(_record(task, i, question, answer, demo.format(entity=entity, answer=answer)))
    else:
        # num_eval questions over the trained facts, cycling through facts and held-out phrasings; the
        # shift by the pass number gives a fact a new phrasing on each pass through the facts.
        phrasings = templates["eval"]
        for i in range(config.num_eval if trained else 0):
            entity, answer = trained[i % len(trained)]
            question = phrasings[(i + i // len(trained)) % len(phrasings)].format(entity=entity)
            out.append(_record(task, i, question, answer, demo.format(entity=entity, answer=answer)))
    return tuple(out)


def _probe(split: str, config: OfflineTaskConfig) -> tuple[Record, ...]:
    order = list(range(len(PROBE_FACTS)))
    random.Random(f"sdft-jax/offline/probe/{config.seed}").shuffle(order)
    n = config.probe_num_train
    lo, hi = {"train": (0, n), "eval": (n, len(order)), "heldout": (0, 0)}[split]
    return tuple(_record("probe", i, *PROBE_FACTS[j]) for i, j in enumerate(order[lo:hi]))
