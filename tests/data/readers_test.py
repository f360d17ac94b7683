"""Tests of sdft_jax/data/readers.py on the real eval sets and on a corpus of broken inputs."""

import collections
import json
import os
import pathlib
import shutil

import datasets
import pyarrow as pa
import pytest

from sdft_jax.data import readers
from sdft_jax.data.records import DataError, Skip

DATA_DIR = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / "self-distillation"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"reference data not found at {DATA_DIR}")

TOOLUSE_TRAIN_SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("golden_answer", pa.list_(pa.struct([("Action", pa.string()), ("Action_Input", pa.string())]))),
    ("golden_response", pa.list_(pa.string())),
])
SCIENCE_TRAIN_SCHEMA = pa.schema([
    ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
    ("output_text", pa.string()),
])
SYSTEM = "Given a question and four options, please select the right answer. Respond in the format ..."


def _write_arrow(split_dir: pathlib.Path, table: pa.Table) -> pathlib.Path:
    """`table` saved as `datasets.save_to_disk` saves a split (the upstream layout); returns its shard."""
    datasets.Dataset(table).save_to_disk(str(split_dir))
    return split_dir / "data-00000-of-00001.arrow"


QUESTION = "Which is right?\n\nA: a\nB: b\nC: c\nD: d"
DEMONSTRATION = "<reasoning>\nR1\nR2\n</reasoning>\n<answer>\nC\n</answer>"


def _science_row(question=QUESTION, text=DEMONSTRATION):
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "output_text": text}


def _tool_row(prompt="Begin!\nQuestion: q", steps=("Thought: t", "Action: getX", "Action Input: {}")):
    return {"prompt": prompt, "golden_answer": [{"Action": "getX", "Action_Input": "{}"}],
            "golden_response": list(steps)}


def _write_jsonl(path: pathlib.Path, lines: list) -> pathlib.Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")
    return path


# --- the real evaluation sets -------------------------------------------------------------------------


@needs_data
def test_tooluse_eval_set():
    result = readers.read_task(DATA_DIR, "tooluse", "eval")
    recs = result.records
    assert len(recs) == 97 and result.skipped == {}
    first = recs[0]
    assert first.task == "tooluse" and first.index == 0 and first.demonstration is None
    assert first.source.endswith("tooluse_data/eval_data/data-00000-of-00001.arrow")
    assert first.gold == ({"Action": "getRandomAxolotlImage", "Action_Input": "{}"},)
    assert first.messages[0]["role"] == "user" and len(first.messages) == 1
    assert first.question.startswith("Your task is to answer the user's question using available tools.")
    assert first.question.endswith("Begin!\nQuestion: Hey, can you show me a random picture of an axolotl?")
    assert recs[26].gold[0]["Action"] == "updateUserProfile"
    assert json.loads(recs[26].gold[0]["Action_Input"])["profileData"] == {
        "profilePictureUrl": "https://example.com/new_image.jpg"}
    # The data README's facts: 143 gold calls; 62 items with one call, 27 with two, 8 with more.
    sizes = collections.Counter(min(len(r.gold), 3) for r in recs)
    assert sum(len(r.gold) for r in recs) == 143 and sizes == {1: 62, 2: 27, 3: 8}


@needs_data
def test_science_eval_set():
    recs = readers.read_task(DATA_DIR, "science", "eval").records
    assert len(recs) == 507
    assert collections.Counter(r.gold for r in recs) == {"A": 123, "B": 127, "C": 127, "D": 130}
    first = recs[0]
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.system.startswith("\nGiven a question and four options, please select the right answer.")
    assert first.question.startswith("Which of the following molecules is the only correct reactant")
    assert (first.gold, recs[1].gold, recs[506].gold) == ("A", "C", "A")
    assert first.demonstration is None


@needs_data
def test_science_eval_thinking_format_replaces_system_prompt():
    recs = readers.read_task(DATA_DIR, "science", "eval", thinking_format=True).records
    assert recs[0].system == (
        "Given a question and four options, please select the right answer. Think step by step, then "
        "output ONLY the letter (A, B, C, or D) as your final answer.")
    assert recs[0].question.startswith("Which of the following molecules")


@needs_data
def test_tooluse_json_is_the_first_68_eval_items():
    old = readers.read_task(DATA_DIR, "tooluse_json", "eval").records
    new = readers.read_task(DATA_DIR, "tooluse", "eval").records
    assert len(old) == 68
    assert old[0].source.endswith("tooluse_data/eval_data.json")
    assert [(r.question, r.gold) for r in old] == [(r.question, r.gold) for r in new[:68]]


@needs_data
@pytest.mark.parametrize("task", ["tooluse", "science"])
def test_missing_train_shard_says_which_file_to_supply(task):
    with pytest.raises(DataError, match="Arrow shard missing") as info:
        readers.read_task(DATA_DIR, task, "train")
    message = str(info.value)
    assert message.startswith(str(DATA_DIR / f"{task}_data" / "train_data" / "data-00000-of-00001.arrow"))
    assert "supply it" in message


# --- training splits in the upstream schema (written here: the upstream shards are not available) ------


def test_tooluse_train_demonstration_is_joined_golden_response(tmp_path):
    _write_arrow(tmp_path / "tooluse_data" / "train_data",
                 pa.Table.from_pylist([_tool_row(), _tool_row(prompt="second")], schema=TOOLUSE_TRAIN_SCHEMA))
    recs = readers.read_task(tmp_path, "tooluse", "train").records
    assert [r.index for r in recs] == [0, 1]
    assert recs[0].demonstration == "Thought: t\nAction: getX\nAction Input: {}"
    assert recs[1].messages == ({"role": "user", "content": "second"},)
    assert recs[0].gold == ({"Action": "getX", "Action_Input": "{}"},)


def test_science_train_keep_system_and_thinking_format(tmp_path):
    _write_arrow(tmp_path / "science_data" / "train_data",
                 pa.Table.from_pylist([_science_row()], schema=SCIENCE_TRAIN_SCHEMA))
    plain = readers.read_task(tmp_path, "science", "train").records[0]
    assert plain.messages == ({"role": "user", "content": QUESTION},)
    assert plain.demonstration == "<reasoning>\nR1\nR2\n</reasoning>\n<answer>\nC\n</answer>"
    assert plain.gold == "C"
    kept = readers.read_task(tmp_path, "science", "train", keep_system=True).records[0]
    assert kept.system == SYSTEM and kept.question == plain.question
    sdft = readers.read_task(tmp_path, "science", "train", thinking_format=True, keep_system=True).records[0]
    assert sdft.demonstration == "R1\nR2\n\nThe answer is C."
    assert sdft.system == readers.THINKING_SYSTEM_PROMPT
    sft = readers.read_task(tmp_path, "science", "train", thinking_format=True, purpose="sft").records[0]
    assert sft.demonstration == "<think>\nR1\nR2\n</think>\n\nThe answer is C."


@pytest.mark.parametrize("text", ["just prose", "<answer>A</answer>", "<reasoning>r</reasoning><answer> </answer>"])
def test_convert_science_demonstration_rejects_other_forms(text):
    with pytest.raises(ValueError):
        readers.convert_science_demonstration(text, "sdft")


def test_science_thinking_format_bad_demonstration_names_row_and_field(tmp_path):
    rows = [_science_row(), _science_row(text="no tags here")]
    _write_arrow(tmp_path / "science_data" / "train_data", pa.Table.from_pylist(rows, schema=SCIENCE_TRAIN_SCHEMA))
    with pytest.raises(DataError, match=r"row 1: field 'output_text': expected '<reasoning>"):
        readers.read_task(tmp_path, "science", "train", thinking_format=True)
    # Without thinking_format the demonstration is used as it is.
    assert len(readers.read_task(tmp_path, "science", "train").records) == 2


# --- generic JSONL ------------------------------------------------------------------------------------


def test_jsonl_happy_path(tmp_path):
    path = _write_jsonl(tmp_path / "skill.jsonl", [
        {"question": "Q0", "demonstration": "D0"},
        b"   ",
        {"question": "Q2", "demonstration": "D2", "system": "S2", "extra": 1},
    ])
    result = readers.read_task(path, "jsonl", "train")
    assert result.skipped == {}
    r0, r2 = result.records
    assert (r0.task, r0.index, r0.source, r0.messages, r0.demonstration, r0.gold) == (
        "jsonl", 0, str(path), ({"role": "user", "content": "Q0"},), "D0", None)
    assert r2.index == 2  # the line index: a blank line is not a row but keeps numbering honest
    assert r2.messages == ({"role": "system", "content": "S2"}, {"role": "user", "content": "Q2"})
    # A folder holding {split}.jsonl works too.
    shutil.copy(path, tmp_path / "train.jsonl")
    assert len(readers.read_task(tmp_path, "jsonl", "train").records) == 2


# --- broken inputs ------------------------------------------------------------------------------------

GOOD = {"question": "Q", "demonstration": "D"}

BAD_JSONL_LINES = [
    # (line, reason, words the error must contain)
    ({"demonstration": "D"}, "missing_field", "row 0 (line 1): field 'question': missing"),
    ({"question": None, "demonstration": "D"}, "missing_field", "field 'question': missing"),
    ({"question": 5, "demonstration": "D"}, "wrong_type", "field 'question': expected str, got int"),
    ({"question": "Q", "demonstration": ["D"]}, "wrong_type", "field 'demonstration': expected str, got list"),
    ({"question": "  \n", "demonstration": "D"}, "empty_field", "field 'question': empty string"),
    ({"question": "Q", "demonstration": ""}, "empty_field", "field 'demonstration': empty string"),
    ({"question": "Q", "demonstration": "D", "system": ""}, "empty_field", "field 'system': empty string"),
    (["Q", "D"], "wrong_type", "row 0 (line 1): expected an object, got list"),
    (b'{"question": "Q", "demonstration": ', "invalid_json", "row 0 (line 1): not JSON"),
    (b'{"question": "Q\xff\xfe", "demonstration": "D"}', "invalid_utf8", "invalid UTF-8 at byte 15 of the line"),
]


@pytest.mark.parametrize("line,reason,words", BAD_JSONL_LINES,
                         ids=[f"{c[1]}{i}" for i, c in enumerate(BAD_JSONL_LINES)])
def test_bad_jsonl_row_raises_naming_file_row_field(tmp_path, line, reason, words):
    path = _write_jsonl(tmp_path / "bad.jsonl", [line, GOOD])
    with pytest.raises(DataError) as info:
        readers.read_task(path, "jsonl", "train")
    assert str(info.value).startswith(f"{path}: row 0 (line 1): ")
    assert words in str(info.value)
    assert info.value.reason == reason
    result = readers.read_task(path, "jsonl", "train", skip_bad_rows=True)
    assert result.skipped == {reason: 1}
    assert [r.index for r in result.records] == [1]


def test_skipped_rows_are_counted_by_reason_and_logged(tmp_path, caplog):
    lines = [GOOD, {"question": 1, "demonstration": "D"}, b"{", {"demonstration": "D"}, b"[", GOOD]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    result = readers.read_task(path, "jsonl", "train", skip_bad_rows=True)
    assert [r.index for r in result.records] == [0, 5]
    assert result.skipped == {"wrong_type": 1, "invalid_json": 2, "missing_field": 1}
    assert result.num_skipped == 4
    assert "skipped 4 bad row(s)" in caplog.text


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = _write_jsonl(tmp_path / "junk.jsonl", [b"{", {"question": 2}])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        readers.read_task(path, "jsonl", "train", skip_bad_rows=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(DataError, match="no rows"):
        readers.read_task(empty, "jsonl", "train")


def test_ten_megabyte_jsonl_row(tmp_path):
    huge = {"question": "Q" * 10_000_000, "demonstration": "D"}
    path = _write_jsonl(tmp_path / "huge.jsonl", [GOOD, huge, GOOD])
    with pytest.raises(DataError, match=r"huge.jsonl: row 1 \(line 2\): line longer than 4,000,001 bytes"):
        readers.read_task(path, "jsonl", "train")
    result = readers.read_task(path, "jsonl", "train", skip_bad_rows=True)
    assert result.skipped == {"row_too_large": 1} and [r.index for r in result.records] == [0, 2]
    # Within the byte bound but over the character limit: caught after decoding. Keys count too:
    # 8 ("question") + 10,000,000 + 13 ("demonstration") + 1 ("D").
    with pytest.raises(DataError, match=r"row 0 \(line 1\): row has 10,000,022 characters, "
                                        r"more than max_row_chars=9,000,000"):
        readers.read_task(_write_jsonl(tmp_path / "h2.jsonl", [huge]), "jsonl", "train", max_row_chars=9_000_000)
    assert len(readers.read_task(path, "jsonl", "train", max_row_chars=20_000_000).records) == 3


def test_ten_megabyte_arrow_row(tmp_path):
    rows = [_tool_row(), _tool_row(prompt="P" * 10_000_000)]
    _write_arrow(tmp_path / "tooluse_data" / "train_data", pa.Table.from_pylist(rows, schema=TOOLUSE_TRAIN_SCHEMA))
    # 10,000,000 + keys (prompt 6, golden_answer 13, Action 6, Action_Input 12, golden_response 15)
    # + values (getX 4, {} 2, the three steps 10 + 12 + 16).
    with pytest.raises(DataError, match=r"row 1: row has 10,000,096 characters, more than max_row_chars=1,000,000"):
        readers.read_task(tmp_path, "tooluse", "train")
    result = readers.read_task(tmp_path, "tooluse", "train", skip_bad_rows=True)
    assert result.skipped == {"row_too_large": 1} and len(result.records) == 1


@needs_data
@pytest.mark.parametrize("keep_bytes", [0.5, -8, 100])
def test_truncated_arrow_copy_names_the_file(tmp_path, keep_bytes):
    src = DATA_DIR / "tooluse_data" / "eval_data"
    dst = tmp_path / "tooluse_data" / "eval_data"
    shutil.copytree(src, dst)
    shard = dst / "data-00000-of-00001.arrow"
    os.chmod(shard, 0o644)
    data = shard.read_bytes()
    n = int(len(data) * keep_bytes) if isinstance(keep_bytes, float) else keep_bytes % len(data)
    shard.write_bytes(data[:n])  # -8: only the end-of-stream marker is gone (a clean message boundary)
    with pytest.raises(DataError, match="truncated") as info:
        readers.read_task(tmp_path, "tooluse", "eval", skip_bad_rows=True)
    assert str(info.value).startswith(str(shard))
    assert info.value.reason == "bad_file"


def test_corrupt_arrow_body_names_the_file(tmp_path):
    path = _write_arrow(tmp_path / "tooluse_data" / "train_data",
                        pa.Table.from_pylist([_tool_row()], schema=TOOLUSE_TRAIN_SCHEMA))
    data = path.read_bytes()
    path.write_bytes(b"\x00" * 64 + data[64:])  # garbage in place of the schema message, EOS intact
    with pytest.raises(DataError, match="truncated or corrupt Arrow stream") as info:
        readers.read_task(tmp_path, "tooluse", "train")
    assert str(info.value).startswith(str(path))


def test_arrow_rows_with_bad_values(tmp_path):
    schema = pa.schema([("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                        ("answer", pa.string())])
    user = {"role": "user", "content": "Q?"}
    rows = [
        {"prompt": [user], "answer": "B"},
        {"prompt": [user], "answer": "E"},
        {"prompt": [user], "answer": None},
        {"prompt": [{"role": "assistant", "content": "x"}], "answer": "A"},
        {"prompt": [{"role": "user", "content": ""}], "answer": "A"},
        {"prompt": [{"role": "user", "content": None}], "answer": "A"},
        {"prompt": [user], "answer": "D"},
    ]
    _write_arrow(tmp_path / "science_data" / "eval_data", pa.Table.from_pylist(rows, schema=schema))
    with pytest.raises(DataError, match=r"row 1: field 'answer': expected one letter A-D, got 'E'"):
        readers.read_task(tmp_path, "science", "eval")
    result = readers.read_task(tmp_path, "science", "eval", skip_bad_rows=True)
    assert [(r.index, r.gold) for r in result.records] == [(0, "B"), (6, "D")]
    assert result.skipped == {"invalid_value": 2, "missing_field": 2, "empty_field": 1}
    _write_arrow(tmp_path / "science_data" / "eval_data", pa.Table.from_pylist(rows[5:], schema=schema))
    with pytest.raises(DataError, match=r"row 0: field 'prompt\[0\].content': missing"):
        readers.read_task(tmp_path, "science", "eval")


def test_arrow_column_of_wrong_type(tmp_path):
    schema = pa.schema([("prompt", pa.int64()), ("golden_answer", TOOLUSE_TRAIN_SCHEMA.field("golden_answer").type)])
    _write_arrow(tmp_path / "tooluse_data" / "eval_data",
                 pa.Table.from_pylist([{"prompt": 3, "golden_answer": []}], schema=schema))
    with pytest.raises(DataError, match=r"row 0: field 'prompt': expected str, got int"):
        readers.read_task(tmp_path, "tooluse", "eval")


@pytest.mark.parametrize("calls,words", [
    ([], "field 'golden_answer': empty list of tool calls"),
    ([{"Action": "a", "Action_Input": "{'x': 1}"}], "field 'golden_answer[0].Action_Input': not JSON"),
    ([{"Action": "a", "Action_Input": "[1]"}], "field 'golden_answer[0].Action_Input': not a JSON object"),
    ([{"Action": "a", "Action_Input": "{}"}, {"Action": "", "Action_Input": "{}"}],
     "field 'golden_answer[1].Action': empty"),
    ([{"Action": "a"}], "field 'golden_answer[0].Action_Input': missing"),
    ("not a list", "field 'golden_answer': expected list, got str"),
])
def test_tooluse_json_bad_gold(tmp_path, calls, words):
    path = tmp_path / "tooluse_data" / "eval_data.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"prompt": "P", "golden_answer": calls}]))
    with pytest.raises(DataError) as info:
        readers.read_task(tmp_path, "tooluse_json", "eval")
    assert str(info.value).startswith(f"{path}: row 0: ") and words in str(info.value)


def test_invalid_utf8_in_arrow_string(tmp_path):
    good = pa.array(["fine"], pa.string())
    # Arrow does not validate UTF-8 on write; build the bad string from raw buffers.
    bad = pa.Array.from_buffers(pa.string(), 1, [None, pa.py_buffer(b"\x00\x00\x00\x00\x03\x00\x00\x00"),
                                                  pa.py_buffer(b"a\xffb")])
    answers = pa.array([[{"Action": "x", "Action_Input": "{}"}]], TOOLUSE_TRAIN_SCHEMA.field("golden_answer").type)
    schema = pa.schema([("prompt", pa.string()), ("golden_answer", answers.type)])
    table = pa.concat_tables([pa.Table.from_arrays([good, answers], schema=schema),
                              pa.Table.from_arrays([bad, answers], schema=schema)])
    _write_arrow(tmp_path / "tooluse_data" / "eval_data", table)
    with pytest.raises(DataError, match=r"row 1: invalid UTF-8"):
        readers.read_task(tmp_path, "tooluse", "eval")
    result = readers.read_task(tmp_path, "tooluse", "eval", skip_bad_rows=True)
    assert result.skipped == {"invalid_utf8": 1} and [r.question for r in result.records] == ["fine"]


def test_bad_whole_files(tmp_path):
    path = tmp_path / "tooluse_data" / "eval_data.json"
    path.parent.mkdir()
    path.write_bytes(b'[{"prompt": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"eval_data.json: invalid UTF-8 at byte 16"):
        readers.read_task(tmp_path, "tooluse_json", "eval")
    path.write_text('{"prompt": "P"}')
    with pytest.raises(DataError, match="expected a JSON list of rows, got dict"):
        readers.read_task(tmp_path, "tooluse_json", "eval")
    with pytest.raises(DataError, match="no such directory"):
        readers.read_task(tmp_path, "science", "eval")
    with pytest.raises(DataError, match="file not found"):
        readers.read_task(tmp_path / "nope.jsonl", "jsonl", "train")
    with pytest.raises(ValueError, match="unknown task"):
        readers.read_task(tmp_path, "math", "eval")
    with pytest.raises(ValueError, match="unknown split"):
        readers.read_task(tmp_path, "science", "test")


# --- read as a stream -----------------------------------------------------------------------------------


def test_a_stream_yields_what_read_task_does_on_every_pass(tmp_path):
    lines = [GOOD, {"question": 1, "demonstration": "D"}, b"{", {**GOOD, "question": "Q2"}]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    held = readers.read_task(path, "jsonl", "train", skip_bad_rows=True)
    stream = readers.stream_task(path, "jsonl", "train", skip_bad_rows=True)
    passes = [list(stream.open()), list(stream.open())]
    # each bad row as a Skip of its reason, in its place
    assert passes[0] == passes[1] == [held.records[0], Skip("wrong_type"), Skip("invalid_json"), held.records[1]]
    first = stream.open()
    assert next(first) == held.records[0]  # parsed as read: nothing further yet
    with pytest.raises(DataError, match="row 1"):  # without skipping, the bad row stops the pass
        list(readers.stream_task(path, "jsonl", "train").open())


def test_a_stream_of_a_saved_split_and_of_nothing_good(tmp_path):
    _write_arrow(tmp_path / "science_data" / "train_data",
                 pa.Table.from_pylist([_science_row(), _science_row(question="Q2")], schema=SCIENCE_TRAIN_SCHEMA))
    stream = readers.stream_task(tmp_path, "science", "train", keep_system=True)
    assert list(stream.open()) == list(readers.read_task(tmp_path, "science", "train", keep_system=True).records)
    junk = _write_jsonl(tmp_path / "junk.jsonl", [b"{", {"question": 2}])
    with pytest.raises(DataError, match="all 2 rows are bad"):
        list(readers.stream_task(junk, "jsonl", "train", skip_bad_rows=True).open())
    with pytest.raises(ValueError, match="unknown split"):
        readers.stream_task(junk, "jsonl", "test")
