"""The one record type every data source produces, and how bad rows are reported.

A `Record` is a problem: the student's messages, the golden demonstration the teacher sees (train
items), and what a scorer compares a completion with. Readers never drop a row silently: a bad row
either raises a `DataError` naming file, row and field, or is skipped and counted by a `SkipCounter`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

_log = logging.getLogger(__name__)

# Reasons a row can be bad; the keys of skip counts.
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_FIELD = "empty_field"
INVALID_JSON = "invalid_json"
INVALID_UTF8 = "invalid_utf8"
INVALID_VALUE = "invalid_value"
ROW_TOO_LARGE = "row_too_large"
NESTED_TOO_DEEP = "nested_too_deep"
BAD_FILE = "bad_file"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One problem, whatever its source.

    Attributes:
      task: "tooluse", "science", "jsonl", or an offline task name; selects the scorer.
      index: row index in its source file.
      source: path of the source file (for error messages and audit).
      messages: the student's messages: an optional system turn, then one user turn.
      demonstration: the golden demonstration shown to the teacher; None for eval-only items.
      gold: what the scorer compares with (tool calls, answer letter, answer string); None if unscored.
    """

    task: str
    index: int
    source: str
    messages: tuple[dict[str, str], ...]
    demonstration: str | None
    gold: Any = None

    def __post_init__(self):
        roles = tuple(m.get("role") for m in self.messages)
        if roles not in (("user",), ("system", "user")):
            raise ValueError(
                f"{self.source}: row {self.index}: messages must be [system,] user; got roles {roles}"
            )

    @property
    def question(self) -> str:
        """The user turn's text."""
        return self.messages[-1]["content"]

    @property
    def system(self) -> str | None:
        """The system turn's text, if the record has one."""
        return self.messages[0]["content"] if len(self.messages) == 2 else None


class DataError(ValueError):
    """A bad input file or row; the message names the file, the row and the field."""

    def __init__(
        self,
        source: str,
        detail: str,
        *,
        row: int | str | None = None,
        field: str | None = None,
        reason: str = INVALID_VALUE,
    ):
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason
        self.detail = detail
        where = [str(source)]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {detail}")


@dataclasses.dataclass(frozen=True)
class Skip:
    """What a stream yields in place of a row or item it skips (a bad row, a dropped prompt): the stream's
    consumer counts it by `reason` (`stream.StreamBatchIterator.skipped`)."""

    reason: str


class SkipCounter:
    """Raises on the first bad row, or (with `skip_bad_rows`) counts bad rows by reason."""

    def __init__(self, source: str, *, skip_bad_rows: bool):
        self.source = source
        self.skip_bad_rows = skip_bad_rows
        self._counts: collections.Counter[str] = collections.Counter()
        self._first: DataError | None = None

    def bad(self, error: DataError) -> None:
        """Reports one bad row: raises `error` unless bad rows are skipped."""
        if not self.skip_bad_rows:
            raise error
        self._counts[error.reason] += 1
        if self._first is None:
            self._first = error

    @property
    def counts(self) -> dict[str, int]:
        """Skipped rows by reason."""
        return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def warn(self) -> None:
        """Logs one warning with the counts (and the first error) if any row was skipped."""
        if self.total:
            _log.warning(
                "%s: skipped %d bad row(s) %s; first: %s", self.source, self.total, self.counts, self._first
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReadResult:
    """What a reader returns: the good records and the bad rows it skipped, by reason."""

    records: tuple[Record, ...]
    skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())
