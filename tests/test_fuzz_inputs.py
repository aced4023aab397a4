"""Fuzz (issue 10): random config mappings and data records either load or raise the
engine's own error with one line; never another exception."""
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from engine.config import load_config, to_dict, validate
from engine.data.records import RECORD_FORMATS, parse_record, validate as validate_records
from engine.data.sources import open_source
from engine.resume_check import flatten
from models.errors import TenureError

BASE = {"model": {"path": "minilm"}, "task": {"kind": "seq_cls"}, "data": {"train": "t.jsonl"}}
KEYS = sorted(flatten(to_dict(validate(BASE))))
FIELDS = sorted({f for fields in RECORD_FORMATS.values() for f in fields} | {"role", "content", "x"})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=string.printable + "äß\u2028\x00", max_size=12),
    st.sampled_from(["1e-3", "inf", "-inf", "nan", "NaN", "true", "yes", "0x10", "", "seq_cls", "adamw",
                     "minilm", "linear", "max", "[1, 2]", "{a: 1}"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS + ["a", "b"]), inner, max_size=3)),
    max_leaves=6)
key_paths = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                      st.lists(st.sampled_from(["model", "data", "train", "optim", "x", "0", "eval"]),
                               min_size=1, max_size=3).map(".".join))


def one_line(error: TenureError) -> bool:
    text = str(error)
    return bool(text) and "\n" not in text and "\r" not in text


def set_path(tree, dotted, value):
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(key_paths, values), max_size=4), st.booleans())
def test_config_mappings_load_or_fail_in_one_line(changes, drop_required):
    tree = json.loads(json.dumps(BASE))
    if drop_required:
        tree.pop("task")
    for dotted, value in changes:
        set_path(tree, dotted, value)
    try:
        cfg = validate(tree, "fuzz.yaml")
    except TenureError as error:
        assert one_line(error), str(error)
    else:
        json.dumps(to_dict(cfg), allow_nan=False)  # what loads is finite and JSON-serialisable


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(alphabet=string.printable + "\x00\x85äß", max_size=200).map(str.encode),
                st.binary(max_size=64)),
       st.lists(st.text(alphabet="abcdefgxyz.=[]{}:,-_01 \"'", max_size=20), max_size=3))
def test_config_files_and_overrides_load_or_fail_in_one_line(tmp_path, content, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(content)
    try:
        load_config(path, overrides)
    except TenureError as error:
        assert one_line(error), str(error)


records = st.one_of(values, st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))


@settings(max_examples=400, deadline=None)
@given(records, st.sampled_from(sorted(RECORD_FORMATS)))
def test_records_parse_or_fail_in_one_line(raw, fmt):
    try:
        record = parse_record("f.jsonl:1", raw, fmt)
    except TenureError as error:
        assert one_line(error), str(error)
        assert str(error).startswith("f.jsonl:1")
    else:
        assert set(RECORD_FORMATS[fmt]) <= set(record)


lines = st.one_of(
    records.map(lambda r: json.dumps(r, allow_nan=True)),
    st.text(alphabet=string.printable + "\x00\u2028", max_size=40),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(lines, min_size=1, max_size=6), st.sampled_from(sorted(RECORD_FORMATS)),
       st.sampled_from(["error", "skip"]))
def test_jsonl_files_load_or_fail_in_one_line(tmp_path, file_lines, fmt, mode):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line.replace("\n", " ") for line in file_lines) + "\n")
    try:
        dataset, _ = validate_records(open_source(str(path)), fmt, on_bad_record=mode)
        for i in range(len(dataset)):
            dataset[i]
    except TenureError as error:
        assert one_line(error), str(error)
