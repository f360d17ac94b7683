"""Rows -> records: each task's fields, checked, for the upstream Self-Distillation layout, generic
JSON Lines, and any dataset `datasets` reads (`sources.py` says where rows come from).

Layout under a user-given `data_dir` (the upstream `data/` folder, spec section 6):

  tooluse_data/{train_data,eval_data}/   `datasets.save_to_disk` folders (ToolAlpaca)
  tooluse_data/eval_data.json            the older 68-item JSON list of the tool-use test set
  science_data/{train_data,eval_data}/   `datasets.save_to_disk` folders (SciKnowEval Chemistry L3)

Generic tasks take their fields from columns named by `Columns` (`config.data.columns`): `jsonl` reads a
JSON Lines file line by line; `dataset` reads whatever `datasets` does (a save_to_disk folder, JSON /
JSON Lines / Parquet files, a dataset name in the local cache; optionally streamed).

Every row is validated; a bad row raises a `DataError` naming file, row and field, or (with
`skip_bad_rows`) is skipped and counted. Besides its fields, a row is refused for what would fail
later, far from the file: more than `max_row_chars` characters, nesting deeper than `MAX_ROW_DEPTH`
(or too deep to parse), a lone surrogate from a broken `\\u` escape (no tokenizer can encode it).
A damaged file always raises: its rows cannot be counted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

from sdft_jax.data import records as rec
from sdft_jax.data import sources
from sdft_jax.data.records import DataError, ReadResult, Record, Skip, SkipCounter
from sdft_jax.validation import check_bool, check_int, check_literals

TASKS = ("tooluse", "science", "tooluse_json", "jsonl", "dataset")
SPLITS = ("train", "eval")
DEFAULT_MAX_ROW_CHARS = 1_000_000
# No row of any source nests deeper than a few levels (a tool call's arguments inside a list of calls).
MAX_ROW_DEPTH = 32

# The science system prompt under `thinking_format` (spec section 6).
THINKING_SYSTEM_PROMPT = (
    "Given a question and four options, please select the right answer. Think step by step, then output "
    "ONLY the letter (A, B, C, or D) as your final answer."
)

_SCIENCE_DEMO = re.compile(r"\s*<reasoning>(.*)</reasoning>\s*<answer>\s*(.*?)\s*</answer>\s*", re.DOTALL)

Purpose = Literal["sdft", "sft"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Columns:
    """Which column of a generic task's rows (`jsonl`, `dataset`) holds each field of a record.

    Attributes:
      question: the user turn (required).
      demonstration: the golden demonstration the teacher sees (required in the train split).
      system: an optional system turn; "" = none.
      answer: what a scorer compares with (`Record.gold`), where the rows have it; "" = none.
    """

    question: str = "question"
    demonstration: str = "demonstration"
    system: str = "system"
    answer: str = ""

    def __post_init__(self):
        for name in ("question", "demonstration", "system", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"Columns.{name} must be a column name, got {value!r}")
        for name in ("question", "demonstration"):
            if not getattr(self, name):
                raise ValueError(f"Columns.{name} must name a column, got ''")
        used = [v for v in (self.question, self.demonstration, self.system, self.answer) if v]
        if len(set(used)) != len(used):
            raise ValueError(f"Columns.question: one column is mapped to two fields: {dataclasses.asdict(self)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadConfig:
    """How rows become records.

    Attributes:
      skip_bad_rows: skip and count bad rows instead of raising on the first one.
      thinking_format: rewrite science demonstrations and system prompts for thinking models.
      purpose: which thinking-format demonstration to build: "sdft" (teacher context) or "sft" (target).
      keep_system: keep the science train system turn (the official code); the recipe drops it.
      max_row_chars: rows with more characters than this (all string fields together) are bad rows.
      columns: the generic tasks' column names.
      streaming: `dataset` task: read rows as needed (no Arrow copy in the datasets cache).
      eval_split: `dataset` task: the name of the "eval" split in a DatasetDict, a dataset loaded by name,
        or a folder of `{split}.*` files ("train" is "train").
    """

    skip_bad_rows: bool = False
    thinking_format: bool = False
    purpose: Purpose = "sdft"
    keep_system: bool = False
    max_row_chars: int = DEFAULT_MAX_ROW_CHARS
    columns: Columns = Columns()
    streaming: bool = False
    eval_split: str = "test"

    def __post_init__(self):
        check_literals(self)
        check_int(f"{type(self).__name__}.max_row_chars", self.max_row_chars, minimum=1)
        check_bool(f"{type(self).__name__}.streaming", self.streaming)
        if not isinstance(self.eval_split, str) or not self.eval_split:
            raise ValueError(f"{type(self).__name__}.eval_split must name a split, got {self.eval_split!r}")


def convert_science_demonstration(text: str, purpose: Purpose) -> str:
    """`<reasoning>R</reasoning><answer>X</answer>` in the thinking-model form of spec section 6.

    "sdft" gives `R\\n\\nThe answer is X.`; "sft" gives `<think>\\nR\\n</think>\\n\\nThe answer is X.`.
    Raises ValueError if `text` is not in the reasoning/answer form.
    """
    m = _SCIENCE_DEMO.fullmatch(text)
    if m is None:
        raise ValueError("expected '<reasoning>...</reasoning><answer>...</answer>'")
    reasoning, answer = m.group(1).strip(), m.group(2)
    if not answer:
        raise ValueError("empty <answer>")
    if purpose == "sft":
        return f"<think>\n{reasoning}\n</think>\n\nThe answer is {answer}."
    return f"{reasoning}\n\nThe answer is {answer}."


# ---------------------------------------------------------------------------------------------------
# Row validation


_UNSET = object()


class _Row:
    """A row being validated: field access that raises `DataError`s naming source, row and field."""

    def __init__(self, data: Any, source: str, index: int, label: str, task: str):
        self.source, self.index, self.label, self.task = source, index, label, task
        if not isinstance(data, dict):
            raise self.error(None, f"expected an object, got {type(data).__name__}", rec.WRONG_TYPE)
        self.data = data

    def error(self, field: str | None, detail: str, reason: str) -> DataError:
        return DataError(self.source, detail, row=self.label, field=field, reason=reason)

    def get(self, field: str, kind: type, *, required: bool = True) -> Any:
        value = self.data.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing", rec.MISSING_FIELD)
            return None
        return self.check(field, value, kind)

    def check(self, field: str, value: Any, kind: type) -> Any:
        if not isinstance(value, kind):
            raise self.error(field, f"expected {kind.__name__}, got {type(value).__name__}", rec.WRONG_TYPE)
        return value

    def text(self, field: str, value: Any = _UNSET, *, required: bool = True) -> str | None:
        """A non-empty string field of the row (or `value`, read from inside it, named `field`)."""
        if value is _UNSET:
            value = self.data.get(field)
        if value is None:
            if required:
                raise self.error(field, "missing", rec.MISSING_FIELD)
            return None
        self.check(field, value, str)
        if not value.strip():
            raise self.error(field, "empty string", rec.EMPTY_FIELD)
        return value

    def messages(self, field: str) -> list[dict[str, str]]:
        """A chat turn list: [system,] user, each with non-empty string role and content."""
        turns = self.get(field, list)
        out = []
        for i, turn in enumerate(turns):
            name = f"{field}[{i}]"
            self.check(name, turn, dict)
            out.append({"role": self.text(f"{name}.role", turn.get("role")),
                        "content": self.text(f"{name}.content", turn.get("content"))})
        return out


def _lone_surrogate(text: str) -> int | None:
    """The position of the first lone UTF-16 surrogate in `text` (a JSON `"\\ud800"` escape decodes to
    one; it cannot be encoded as UTF-8, so a tokenizer fails on it), or None."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _check_row(data: Any, source: str, label: str, max_row_chars: int) -> None:
    """Refuses a row nested deeper than `MAX_ROW_DEPTH`, larger than `max_row_chars` characters (all
    strings together, keys included), or holding a string that is not valid Unicode text.

    Iterative, so no row can exhaust Python's recursion limit here."""
    chars, surrogate = 0, None
    # (value, its path in the row, its depth, the row's field it is in)
    stack: list[tuple[Any, str, int, str | None]] = [(data, "", 0, None)]
    while stack:
        value, path, depth, field = stack.pop()
        if isinstance(value, str):
            chars += len(value)
            if surrogate is None and (at := _lone_surrogate(value)) is not None:
                surrogate = (path, at, value[at])
            continue
        if not isinstance(value, (dict, list, tuple)):
            continue
        if depth >= MAX_ROW_DEPTH:
            raise DataError(source, f"nested more than {MAX_ROW_DEPTH} levels deep", row=label, field=field,
                            reason=rec.NESTED_TOO_DEEP)
        # Pushed last to first, so that fields are visited (and the first bad one named) in row order.
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                name = f"{path}.{key}" if path else str(key)
                stack += [(item, name, depth + 1, field or name), (key, name, depth + 1, field or name)]
        else:
            stack.extend((value[i], f"{path}[{i}]", depth + 1, field or f"[{i}]")
                         for i in reversed(range(len(value))))
    if chars > max_row_chars:
        raise DataError(source, f"row has {chars:,} characters, more than max_row_chars={max_row_chars:,}",
                        row=label, reason=rec.ROW_TOO_LARGE)
    if surrogate is not None:
        path, at, char = surrogate
        raise DataError(source, f"lone surrogate U+{ord(char):04X} at character {at} (not valid Unicode text; "
                        "a broken \\u escape?)", row=label, field=path or None, reason=rec.INVALID_UTF8)


# ---------------------------------------------------------------------------------------------------
# Row -> Record, per source


def _tool_calls(row: _Row, field: str) -> tuple[dict[str, str], ...]:
    calls = row.get(field, list)
    if not calls:
        raise row.error(field, "empty list of tool calls", rec.EMPTY_FIELD)
    out = []
    for i, call in enumerate(calls):
        name = f"{field}[{i}]"
        row.check(name, call, dict)
        action = row.text(f"{name}.Action", call.get("Action"))
        args = call.get("Action_Input")
        if args is None:
            raise row.error(f"{name}.Action_Input", "missing", rec.MISSING_FIELD)
        row.check(f"{name}.Action_Input", args, str)
        try:
            parsed = sources.parse_json(args)
        except ValueError as e:
            raise row.error(f"{name}.Action_Input", str(e), rec.INVALID_JSON) from None
        if not isinstance(parsed, dict):
            raise row.error(f"{name}.Action_Input", "not a JSON object", rec.INVALID_VALUE)
        out.append({"Action": action, "Action_Input": args})
    return tuple(out)


def _tooluse_record(row: _Row, split: str, config: ReadConfig) -> Record:
    question = row.text("prompt")
    if split == "train":
        steps = row.get("golden_response", list)
        if not steps:
            raise row.error("golden_response", "empty list", rec.EMPTY_FIELD)
        for i, step in enumerate(steps):
            row.check(f"golden_response[{i}]", step, str)
        demonstration = "\n".join(steps)
        if not demonstration.strip():
            raise row.error("golden_response", "only empty strings", rec.EMPTY_FIELD)
        # Training never scores, so the gold calls are kept only where the row has them.
        gold = _tool_calls(row, "golden_answer") if row.data.get("golden_answer") is not None else None
    else:
        demonstration, gold = None, _tool_calls(row, "golden_answer")
    return Record(task="tooluse", index=row.index, source=row.source,
                  messages=({"role": "user", "content": question},), demonstration=demonstration, gold=gold)


def _science_record(row: _Row, split: str, config: ReadConfig) -> Record:
    field = "messages" if split == "train" else "prompt"
    turns = row.messages(field)
    roles = [t["role"] for t in turns]
    if roles not in (["user"], ["system", "user"]):
        raise row.error(field, f"expected roles [system, user], got {roles}", rec.INVALID_VALUE)
    if config.thinking_format and roles[0] == "system":
        turns[0] = {"role": "system", "content": THINKING_SYSTEM_PROMPT}
    if split == "train":
        # The question is messages[1] (the user turn); the recipe drops the system turn, the official
        # code keeps it.
        if not config.keep_system:
            turns = turns[-1:]
        demonstration = row.text("output_text")
        if config.thinking_format:
            try:
                demonstration = convert_science_demonstration(demonstration, config.purpose)
            except ValueError as e:
                raise row.error("output_text", str(e), rec.INVALID_VALUE) from None
        gold = None
        m = _SCIENCE_DEMO.fullmatch(row.data["output_text"])
        if m and m.group(2) in ("A", "B", "C", "D"):
            gold = m.group(2)
    else:
        demonstration = None
        gold = row.text("answer")
        if gold not in ("A", "B", "C", "D"):
            raise row.error("answer", f"expected one letter A-D, got {gold[:20]!r}", rec.INVALID_VALUE)
    return Record(task="science", index=row.index, source=row.source, messages=tuple(turns),
                  demonstration=demonstration, gold=gold)


def _generic_record(row: _Row, split: str, config: ReadConfig) -> Record:
    """A `jsonl` / `dataset` row, its fields in the columns `config.columns` names."""
    cols = config.columns
    question = row.text(cols.question)
    demonstration = row.text(cols.demonstration, required=split == "train")
    system = row.text(cols.system, required=False) if cols.system else None
    gold = row.text(cols.answer, required=split == "eval") if cols.answer else None
    messages = ({"role": "system", "content": system},) if system is not None else ()
    messages += ({"role": "user", "content": question},)
    return Record(task=row.task, index=row.index, source=row.source, messages=messages,
                  demonstration=demonstration, gold=gold)


_RowParser = Callable[[_Row, str, ReadConfig], Record]
_PARSERS: dict[str, _RowParser] = {"tooluse": _tooluse_record, "tooluse_json": _tooluse_record,
                                   "science": _science_record, "jsonl": _generic_record, "dataset": _generic_record}


def _parse(rows: Iterator[sources.Row], source: str, task: str, split: str, config: ReadConfig,
           counter: SkipCounter) -> Iterator[Record]:
    """Parses `(index, label, row)` triples as they come; `label` names the row in errors. A bad row
    raises, or is counted in `counter` and skipped."""
    parse = _PARSERS[task]
    record_task = "tooluse" if task == "tooluse_json" else task
    for index, label, data in rows:
        try:
            if isinstance(data, DataError):  # a row the file layer could not decode
                raise data
            _check_row(data, source, label, config.max_row_chars)
            record = parse(_Row(data, source, index, label, record_task), split, config)
        except DataError as e:
            counter.bad(e)
            continue
        yield record


def _collect(rows: Iterator[sources.Row], source: str, task: str, split: str, config: ReadConfig) -> ReadResult:
    """Every record of `rows` (`_parse`), with the bad rows skipped by reason."""
    counter = SkipCounter(source, skip_bad_rows=config.skip_bad_rows)
    out = list(_parse(rows, source, task, split, config, counter))
    counter.warn()
    if not out:
        raise _no_records(source, counter)
    return ReadResult(records=tuple(out), skipped=counter.counts)


def _no_records(source: str, counter: SkipCounter) -> DataError:
    detail = f"all {counter.total} rows are bad: {counter.counts}" if counter.total else "no rows"
    return DataError(source, detail, reason=rec.BAD_FILE)


class RecordStream:
    """One task split read as a stream: each `open()` reads the source again from its first row and yields
    its records as they are parsed, so the split is never held whole (`data.streaming` in the trainer).

    A bad row skipped under `skip_bad_rows` is yielded as a `Skip` of its reason, in its place, for the
    consumer to count; without it, the bad row raises. A pass with no good record raises the same
    `DataError` as `read_task`.
    """

    def __init__(self, open_rows: Callable[[], tuple[str, Iterator[sources.Row]]], task: str, split: str,
                 config: ReadConfig):
        self._open_rows = open_rows
        self.task, self.split, self.config = task, split, config

    def open(self) -> Iterator[Record | Skip]:
        source, rows = self._open_rows()
        counter = SkipCounter(source, skip_bad_rows=self.config.skip_bad_rows)
        reported: dict[str, int] = {}

        def skips() -> Iterator[Skip]:  # the rows counted since the last call
            for reason, n in counter.counts.items():
                yield from (Skip(reason) for _ in range(n - reported.get(reason, 0)))
                reported[reason] = n

        found = 0
        for record in _parse(rows, source, self.task, self.split, self.config, counter):
            yield from skips()
            found += 1
            yield record
        yield from skips()
        counter.warn()
        if not found:
            raise _no_records(source, counter)


# ---------------------------------------------------------------------------------------------------
# Entry points


def read_jsonl(path: str | os.PathLike, split: str = "train", *, config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of a generic JSON Lines file, read line by line: `config.columns` (by default
    `{"question", "demonstration", optional "system"}`) per line."""
    path = os.fspath(path)
    return _collect(sources.jsonl_rows(path, config.max_row_chars), path, "jsonl", split, config)


def read_tooluse_json(path: str | os.PathLike, *, config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of the older JSON-list tool-use test set (`tooluse_data/eval_data.json`)."""
    path = os.fspath(path)
    return _collect(sources.json_list_rows(path), path, "tooluse_json", "eval", config)


def read_saved_split(split_dir: str | os.PathLike, task: str, split: str, *,
                     config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of one `datasets.save_to_disk` split folder of the tool-use or science task."""
    if task not in ("tooluse", "science"):
        raise ValueError(f"unknown upstream task {task!r}; expected 'tooluse' or 'science'")
    source, rows = sources.saved_rows(os.fspath(split_dir))
    return _collect(rows, source, task, split, config)


def read_dataset(path: str | os.PathLike, split: str, *, config: ReadConfig = ReadConfig()) -> ReadResult:
    """Records of split `split` ("train" or "eval") of anything `datasets` reads (`sources.open_rows`:
    a save_to_disk folder, a JSON / JSON Lines / Parquet file or a folder of them, a cached dataset
    name), their fields in `config.columns`."""
    source, rows = _task_rows(os.fspath(path), "dataset", split, config)
    return _collect(rows, source, "dataset", split, config)


def read_task(
    data_dir: str | os.PathLike,
    task: str,
    split: str,
    *,
    skip_bad_rows: bool = False,
    thinking_format: bool = False,
    purpose: Purpose = "sdft",
    keep_system: bool = False,
    max_row_chars: int = DEFAULT_MAX_ROW_CHARS,
    columns: Columns = Columns(),
    streaming: bool = False,
    eval_split: str = "test",
) -> ReadResult:
    """Records of one task split from `data_dir`.

    Tasks: "tooluse" and "science" (the upstream layout's save_to_disk splits "train" and "eval"),
    "tooluse_json" (the older `tooluse_data/eval_data.json`, split "eval"), "jsonl" (`data_dir` is the
    .jsonl file itself, or a folder holding `{split}.jsonl`) and "dataset" (`read_dataset`). See
    `ReadConfig` for the options; `keep_system` concerns the science train split only (the science eval
    prompts always keep their system turn, as both reference implementations do).
    """
    config = ReadConfig(skip_bad_rows=skip_bad_rows, thinking_format=thinking_format, purpose=purpose,
                        keep_system=keep_system, max_row_chars=max_row_chars, columns=columns,
                        streaming=streaming, eval_split=eval_split)
    _check_task_split(task, split)
    source, rows = _task_rows(os.fspath(data_dir), task, split, config)
    return _collect(rows, source, task, split, config)


def stream_task(data_dir: str | os.PathLike, task: str, split: str, **options: Any) -> RecordStream:
    """The records of one task split from `data_dir` (as `read_task`, with the `ReadConfig` fields as
    `options`), as a `RecordStream`: read again on every pass, never held whole."""
    config = ReadConfig(**options)
    _check_task_split(task, split)
    data_dir = os.fspath(data_dir)
    return RecordStream(lambda: _task_rows(data_dir, task, split, config), task, split, config)


def _check_task_split(task: str, split: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if task == "tooluse_json" and split != "eval":
        raise ValueError("tooluse_json has only the 'eval' split")


def _task_rows(data_dir: str, task: str, split: str, config: ReadConfig) -> tuple[str, Iterator[sources.Row]]:
    """The source name and rows of one task split (see `read_task`)."""
    if task in ("tooluse", "science"):
        return sources.saved_rows(os.path.join(data_dir, f"{task}_data", f"{split}_data"))
    if task == "tooluse_json":
        path = os.path.join(data_dir, "tooluse_data", "eval_data.json")
        return path, sources.json_list_rows(path)
    if task == "jsonl":
        path = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, f"{split}.jsonl")
        return path, sources.jsonl_rows(path, config.max_row_chars)
    name = "train" if split == "train" else config.eval_split  # dataset
    return sources.open_rows(data_dir, name, streaming=config.streaming, max_row_chars=config.max_row_chars)
