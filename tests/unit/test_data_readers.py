from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from llmos.data.readers import read_dataset, read_jsonl, write_jsonl
from llmos.data.rows import dataset_shape, row_content_key, row_shape, row_text
from llmos.errors import InvalidInputError


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --- rows ------------------------------------------------------------------------------------------------------------


def test_row_shapes_and_text() -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "id": 3}
    assert row_shape({"text": "x", "id": 1}) == "text"
    assert row_shape({"prompt": "a", "completion": "b", "split": "train"}) == "completion"
    assert row_shape(chat) == "chat"
    assert row_text({"prompt": "Q? ", "completion": "A."}) == "Q? A."
    assert row_text(chat) == "system: Be brief.\nuser: Hi"
    assert row_content_key({"text": "x", "id": 1}) == row_content_key({"text": "x", "id": 2})
    assert row_content_key({"text": "x"}) != row_content_key({"text": "y"})


def test_row_without_shape_names_fields_and_accepted_shapes() -> None:
    with pytest.raises(InvalidInputError) as info:
        row_shape({"question": "q", "label": 1})
    assert "['label', 'question']" in info.value.message
    assert "completion" in info.value.message and "chat" in info.value.message
    with pytest.raises(InvalidInputError, match="role 'robot'"):
        row_shape({"messages": [{"role": "robot", "content": "x"}]})


def test_dataset_shape_names_first_offending_row() -> None:
    with pytest.raises(InvalidInputError, match="the dataset is empty"):
        dataset_shape([])
    with pytest.raises(InvalidInputError, match="row 2 has shape 'text'"):
        dataset_shape([{"prompt": "a", "completion": "b"}] * 2 + [{"text": "c"}])


# --- formats ---------------------------------------------------------------------------------------------------------


def test_jsonl_keeps_extra_fields(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "p1", "completion": "c1", "id": 7}),
            "",
            json.dumps({"prompt": "p2", "completion": "c2"}),
        ],
    )
    rows, report = read_dataset(path)
    assert rows == [{"prompt": "p1", "completion": "c1", "id": 7}, {"prompt": "p2", "completion": "c2"}]
    assert (report.format, report.shape, report.rows, report.skipped) == ("jsonl", "completion", 2, [])


def test_json_array_and_chat_shape(tmp_path: Path) -> None:
    rows_in = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 2
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows_in, indent=2), encoding="utf-8")
    rows, report = read_dataset(path)
    assert rows == rows_in
    assert (report.format, report.shape, report.rows) == ("json", "chat", 2)


def test_csv_question_answer_maps_to_completion(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text('Question,Answer,source\n"What, exactly?","It is ""this"".",web\nWhy?,"Line one\nline two",book\n')
    rows, report = read_dataset(path)
    assert rows == [
        {"prompt": "What, exactly?", "completion": 'It is "this".', "source": "web"},
        {"prompt": "Why?", "completion": "Line one\nline two", "source": "book"},
    ]
    assert (report.format, report.shape) == ("csv", "completion")


def test_csv_without_shape_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InvalidInputError) as info:
        read_dataset(path)
    assert "['a', 'b']" in info.value.message and "'text' column" in info.value.message


def test_csv_row_with_wrong_field_count_is_reported_with_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("text,id\nhello,1\nbad,2,3\nworld,4\n")
    with pytest.raises(InvalidInputError, match="line 3 has 3 fields but the header has 2"):
        read_dataset(path)
    rows, report = read_dataset(path, on_error="skip")
    assert [r["text"] for r in rows] == ["hello", "world"]
    assert report.skipped == [(3, "line 3 has 3 fields but the header has 2")]


def test_text_modes(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "notes.md", ["# Title", "first line", "", "", "second para", "continues", "  "])
    rows, report = read_dataset(path)
    assert [r["text"] for r in rows] == ["# Title", "first line", "second para", "continues"]
    assert (report.format, report.shape) == ("text", "text")
    rows, _ = read_dataset(path, text_mode="paragraph")
    assert [r["text"] for r in rows] == ["# Title\nfirst line", "second para\ncontinues"]
    rows, _ = read_dataset(path, text_mode="document")
    assert rows == [{"text": "# Title\nfirst line\n\n\nsecond para\ncontinues"}]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"], "n": [1, 2]}), path)
    rows, report = read_dataset(path)
    assert rows == [{"prompt": "p1", "completion": "c1", "n": 1}, {"prompt": "p2", "completion": "c2", "n": 2}]
    assert (report.format, report.shape, report.rows) == ("parquet", "completion", 2)
    # sniffed by content, whatever the name
    renamed = tmp_path / "d.data"
    renamed.write_bytes(path.read_bytes())
    assert read_dataset(renamed)[1].format == "parquet"


def test_sniffing_unknown_extensions(tmp_path: Path) -> None:
    jsonl = write_lines(tmp_path / "rows.dat", [json.dumps({"text": "a"}), json.dumps({"text": "b"})])
    assert read_dataset(jsonl)[1].format == "jsonl"
    csv_file = tmp_path / "rows.tsvx"
    csv_file.write_text("prompt,completion\nq,a\n")
    assert read_dataset(csv_file)[0] == [{"prompt": "q", "completion": "a"}]
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02GGUF\xff" * 10)
    with pytest.raises(InvalidInputError) as info:
        read_dataset(binary)
    assert "unknown format" in info.value.message and ".parquet" in info.value.message
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(InvalidInputError, match="not a Parquet file"):
        read_dataset(fake)


# --- errors -----------------------------------------------------------------------------------------------------------


def test_empty_files(tmp_path: Path) -> None:
    for name, content in [("e.jsonl", ""), ("b.jsonl", "\n\n  \n"), ("e.txt", "\n \n"), ("h.csv", "text\n")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(InvalidInputError, match="the dataset is empty"):
            read_dataset(path)


def test_unknown_shape_says_what_was_found_and_accepted(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"question": "q", "label": 1})] * 2)
    for mode in ("fail", "skip"):
        with pytest.raises(InvalidInputError) as info:
            read_dataset(path, on_error=mode)
        assert "line 1 has fields ['label', 'question']" in info.value.message
        assert '"prompt": str, "completion": str' in info.value.message


def test_malformed_jsonl_fail_lists_line_numbers(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"row {i}"}) for i in range(30)]
    for bad in (2, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25):  # 12 bad lines (0-based indexes)
        lines[bad] = '{"text": "unterminated'
    lines[3] = "[1, 2]"
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(InvalidInputError) as info:
        read_dataset(path)
    message = info.value.message
    assert message.startswith("13 malformed lines in d.jsonl: line 3 is not valid JSON")
    assert "line 4 is a JSON array, not an object" in message
    assert "line 20 is not valid JSON" in message  # the 10th
    assert "line 22 " not in message and "and 3 more" in message
    assert "on_error='skip'" in message


def test_malformed_jsonl_skip_records_reasons(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"text": "ok 1"}\n'
        b"not json\n"
        b'{"text": "bad \xff utf8"}\n'
        b'{"prompt": "other", "completion": "shape"}\n'
        b'{"text": "ok 2"}\r\n'
        b'{"text": "ok 3"}'
    )
    rows, report = read_dataset(path, on_error="skip")
    assert [r["text"] for r in rows] == ["ok 1", "ok 2", "ok 3"]
    assert [number for number, _ in report.skipped] == [2, 3, 4]
    assert report.skipped[0][1].startswith("line 2 is not valid JSON (Expecting value at column 1")
    assert report.skipped[1][1] == "line 3 is not valid UTF-8 (byte 15)"
    assert "shape 'completion' but the rows before it have shape 'text'" in report.skipped[2][1]
    assert report.as_dict()["skipped"][0]["line"] == 2
    assert report.skipped_total == 3


def test_line_longer_than_limit_is_drained_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "before"}\n')
        f.write(b'{"text": "' + b"x" * (5 * 1024 * 1024) + b'"}\n')
        f.write(b'{"text": "after"}\n')
    with pytest.raises(InvalidInputError, match="line 2 is longer than 1024 bytes"):
        read_dataset(path, max_line_bytes=1024)
    rows, report = read_dataset(path, on_error="skip", max_line_bytes=1024)
    assert [r["text"] for r in rows] == ["before", "after"]
    assert report.skipped == [(2, "line 2 is longer than 1024 bytes")]


def test_long_line_limit_is_exact(tmp_path: Path) -> None:
    row = json.dumps({"text": "abc"}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(row + b"\n" + row)
    assert read_dataset(path, max_line_bytes=len(row))[1].rows == 2
    with pytest.raises(InvalidInputError, match="line 1 is longer than"):
        read_dataset(path, max_line_bytes=len(row) - 1)


def test_long_line_in_text_and_csv(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_bytes(b"short\n" + b"y" * 5000 + b"\nend\n")
    rows, report = read_dataset(text, on_error="skip", max_line_bytes=1024)
    assert [r["text"] for r in rows] == ["short", "end"]
    assert report.skipped == [(2, "line 2 is longer than 1024 bytes")]
    csv_file = tmp_path / "t.csv"
    csv_file.write_bytes(b"text\nshort\n" + b"z" * 5000 + b"\nend\n")
    rows, report = read_dataset(csv_file, on_error="skip", max_line_bytes=1024)
    assert [r["text"] for r in rows] == ["short", "end"]
    assert report.skipped == [(3, "line 3 is longer than 1024 bytes")]


def test_big_json_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "x" * 100}] * 50))
    with pytest.raises(InvalidInputError, match="convert it to JSON Lines"):
        read_dataset(path, max_line_bytes=1024)


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "a"})])
    with pytest.raises(InvalidInputError) as info:
        read_dataset(path, on_error="ignore")
    assert info.value.param == "on_error"
    with pytest.raises(InvalidInputError, match="text_mode"):
        read_dataset(path, text_mode="sentence")
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_dataset(tmp_path / "missing.jsonl")


# --- canonical JSONL --------------------------------------------------------------------------------------------------


def test_write_jsonl_is_canonical_and_round_trips(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"text": "héllo", "b": 1, "a": [1, 2]}, {"text": "second"}]
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl(rows, path)
    assert path.read_bytes() == '{"a": [1, 2], "b": 1, "text": "héllo"}\n{"text": "second"}\n'.encode()
    assert read_jsonl(path) == rows
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(InvalidInputError, match="row 0 cannot be written as JSON"):
        write_jsonl([{"text": float("nan")}], path)
    assert read_jsonl(path) == rows  # the failed write left the old file intact


def test_long_line_never_held_in_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "' + b"x" * (8 * 1024 * 1024) + b'"}\n{"text": "ok"}\n')
    tracemalloc.start()
    try:
        rows, _ = read_dataset(path, on_error="skip", max_line_bytes=1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == [{"text": "ok"}]
    assert peak < 1024 * 1024  # the 8 MiB line was drained in chunks, never read whole
