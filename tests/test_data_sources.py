"""Sources: every file type read back exactly, with locations; the JSONL/CSV offset index cache."""

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from tenure.engine.data import sources
from tenure.engine.data.sources import BAD_RAW_KEY, index_path, open_source, select
from tenure.models.errors import TenureError


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_jsonl_records_and_locations_skip_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "héllo", "label": "a"}\n\n  \n{"text": "b", "label": 2}\n{oops\n')
    ds = open_source(str(path))
    assert _all(ds) == [
        (f"{path}:1", {"text": "héllo", "label": "a"}),
        (f"{path}:4", {"text": "b", "label": 2}),
        (f"{path}:5", {BAD_RAW_KEY: "invalid JSON: Expecting property name enclosed in "
                                    "double quotes at column 2"}),
    ]
    assert ds[1] == (f"{path}:4", {"text": "b", "label": 2})  # random access


def test_jsonl_last_line_without_newline_and_json_extension(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}')
    assert _all(open_source(str(path))) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]


def test_csv_multiline_quoted_row_reports_its_first_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes('\ufefftext,label\n"two\nlines",pos\n\nplain,neg\nshort\n'.encode())
    assert _all(open_source(str(path))) == [
        (f"{path}:2", {"text": "two\nlines", "label": "pos"}),
        (f"{path}:5", {"text": "plain", "label": "neg"}),
        (f"{path}:6", {BAD_RAW_KEY: "row has 1 columns, header has 2"}),
    ]


def test_tsv_and_explicit_format(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("text_a\ttext_b\tlabel\nA man\tA person\tentail\n")
    assert _all(open_source(str(path), fmt="tsv")) == [
        (f"{path}:2", {"text_a": "A man", "text_b": "A person", "label": "entail"})]


def test_tsv_quotation_marks_are_text_and_a_repeated_header_column_is_refused(tmp_path):
    """TSV has no quoting: a cell opening with a quotation mark ran on over tabs and lines to the
    next one, merging three rows into one record with another row's label (5 lines, 3 records)."""
    path = tmp_path / "q.tsv"
    path.write_text('text\tlabel\n"Great" said nobody\tpos\n"an opening quote only\tneg\nfine\tpos\n'
                    'a "quote" inside\tneg\nlast\tpos\n')
    assert _all(open_source(str(path))) == [
        (f"{path}:2", {"text": '"Great" said nobody', "label": "pos"}),
        (f"{path}:3", {"text": '"an opening quote only', "label": "neg"}),
        (f"{path}:4", {"text": "fine", "label": "pos"}),
        (f"{path}:5", {"text": 'a "quote" inside', "label": "neg"}),
        (f"{path}:6", {"text": "last", "label": "pos"})]
    dup = tmp_path / "dup.csv"
    dup.write_text("text,label,text\nhello,pos,world\n")  # the record kept the last 'text' column
    with pytest.raises(TenureError, match=rf"^{dup}:1: column 'text' appears twice in the header$"):
        open_source(str(dup))


def test_parquet_rows_across_row_groups(tmp_path):
    path = tmp_path / "train.parquet"
    table = pa.table({"text": [f"t{i}" for i in range(5)], "target": [0.5 * i for i in range(5)]})
    pq.write_table(table, path, row_group_size=2)
    ds = open_source(str(path))
    assert len(ds) == 5
    assert ds[4] == (f"{path}:row 4", {"text": "t4", "target": 2.0})
    assert ds[1] == (f"{path}:row 1", {"text": "t1", "target": 0.5})
    assert [loc for loc, _ in _all(ds)] == [f"{path}:row {i}" for i in range(5)]


def test_arrayrecord_json_records(tmp_path):
    path = tmp_path / "train.arrayrecord"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in ({"text": "x", "label": "a"}, {"text": "y", "label": "b"}):
        writer.write(json.dumps(record).encode())
    writer.write(b"not json")
    writer.close()
    assert _all(open_source(str(path))) == [
        (f"{path}:record 0", {"text": "x", "label": "a"}),
        (f"{path}:record 1", {"text": "y", "label": "b"}),
        (f"{path}:record 2", {BAD_RAW_KEY: "invalid JSON: Expecting value at column 1"}),
    ]


def test_glob_and_lists_concatenate_in_sorted_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.csv"):
        content = "v\n9\n" if name.endswith("csv") else f'{{"v": "{name}"}}\n'
        (tmp_path / name).write_text(content)
    ds = open_source([str(tmp_path / "*.jsonl"), str(tmp_path / "c.csv"), str(tmp_path / "a.jsonl")])
    assert _all(ds) == [(f"{tmp_path}/a.jsonl:1", {"v": "a.jsonl"}),
                        (f"{tmp_path}/b.jsonl:1", {"v": "b.jsonl"}),
                        (f"{tmp_path}/c.csv:2", {"v": "9"})]


def test_open_errors_name_the_path(tmp_path):
    with pytest.raises(TenureError, match=f"^{tmp_path}/nothing-\\*.jsonl: no file matches this pattern$"):
        open_source(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(TenureError, match=f"^{tmp_path}/gone.jsonl: no such file$"):
        open_source(str(tmp_path / "gone.jsonl"))
    (tmp_path / "x.bin").write_text("?")
    with pytest.raises(TenureError, match="x.bin: unknown file type"):
        open_source(str(tmp_path / "x.bin"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(TenureError, match=f"^{tmp_path}/bad.parquet: cannot read Parquet file"):
        open_source(str(tmp_path / "bad.parquet"))
    with pytest.raises(TenureError, match="^data: no input paths given$"):
        open_source([])


def test_unreadable_file_is_an_open_time_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.jsonl"
    path.write_text('{"a": 1}\n')
    monkeypatch.setattr(sources.os, "access", lambda p, mode: False)  # root ignores chmod
    with pytest.raises(TenureError, match=f"^{path}: file is not readable"):
        open_source(str(path))


def test_jsonl_index_cached_reused_and_rebuilt(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_text('{"i": 1}\n{"i": 2}\n')
    open_source(str(path))
    cache = tmp_path / ".train.jsonl.tenure-idx"
    assert index_path(str(path)) == str(cache) and cache.exists()
    with np.load(cache) as saved:
        np.testing.assert_array_equal(saved["index"], [[0, 1], [9, 2]])
    cache_mtime = cache.stat().st_mtime_ns

    calls = []
    real_build = sources._jsonl_index
    monkeypatch.setattr(sources, "_jsonl_index", lambda p: calls.append(p) or real_build(p))
    assert len(open_source(str(path))) == 2
    assert calls == [] and cache.stat().st_mtime_ns == cache_mtime

    path.write_text('{"i": 1}\n{"i": 2}\n{"i": 3}\n')
    ds = open_source(str(path))
    assert calls == [str(path)] and ds[2] == (f"{path}:3", {"i": 3})
    with np.load(cache) as saved:
        assert len(saved["index"]) == 3

    # Same size, new mtime: rebuilt too.
    path.write_text('{"i": 7}\n{"i": 8}\n{"i": 9}\n')
    os.utime(path, ns=(1, 1))
    assert open_source(str(path))[0] == (f"{path}:1", {"i": 7}) and len(calls) == 2


def test_index_kept_in_memory_when_cache_cannot_be_written(tmp_path, monkeypatch):
    path = tmp_path / "train.jsonl"
    path.write_text('{"i": 1}\n')
    monkeypatch.setattr(sources, "index_path", lambda p: str(tmp_path / "no-such-dir" / "idx"))
    assert _all(open_source(str(path))) == [(f"{path}:1", {"i": 1})]
    assert sorted(os.listdir(tmp_path)) == ["train.jsonl"]


def test_sources_pickle_for_grain_workers(tmp_path):
    jsonl, parquet = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    jsonl.write_text('{"i": 1}\n')
    pq.write_table(pa.table({"i": [2]}), parquet)
    ds = open_source([str(jsonl), str(parquet)])
    ds[1]  # opened handles must not break pickling
    assert _all(pickle.loads(pickle.dumps(ds))) == [(f"{jsonl}:1", {"i": 1}), (f"{parquet}:row 0", {"i": 2})]


def test_select_views_chosen_indices():
    assert list(select(["a", "b", "c"], np.array([2, 0]))) == ["c", "a"]


def test_corrupt_index_cache_is_rebuilt(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"i": 1}\n')
    (tmp_path / ".train.jsonl.tenure-idx").write_bytes(b"garbage")
    assert _all(open_source(str(path))) == [(f"{path}:1", {"i": 1})]
    with np.load(tmp_path / ".train.jsonl.tenure-idx") as saved:
        np.testing.assert_array_equal(saved["index"], [[0, 1]])


def test_empty_file_has_no_records(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.csv").write_text("")
    assert len(open_source([str(tmp_path / "e.jsonl"), str(tmp_path / "e.csv")])) == 0


def test_index_cache_is_per_format(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text('a\n"x\ny"\n')
    assert _all(open_source(str(path), fmt="csv")) == [(f"{path}:2", {"a": "x\ny"})]
    assert _all(open_source(str(path), fmt="tsv")) == [(f"{path}:2", {"a": '"x'}), (f"{path}:3", {"a": 'y"'})]
    assert [loc for loc, _ in _all(open_source(str(path), fmt="jsonl"))] == [f"{path}:1", f"{path}:2", f"{path}:3"]
