"""Fuzz (issues 10, 25): random config mappings (single-task and staged), study files and data
records either load or raise the engine's own error with one line; never another exception."""
import json
import pathlib
import string

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from tenure.engine.config.schema import _set_path, load_config, to_dict, validate
from tenure.engine.data.records import RECORD_FORMATS, parse_record, validate as validate_records
from tenure.engine.data.sources import open_source
from tenure.engine.runtime.resume_check import flatten
from tenure.models.errors import TenureError

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


# -- staged configs and study files (issue 25): config checking only, nothing is trained ----------------------

LEXNAMES = str(pathlib.Path(__file__).resolve().parents[1] / "data/wordnet_lexnames")
STAGED_BASE = {
    "model": {"path": "minilm"}, "heads": "shared",
    "tasks": {name: {"kind": "seq_cls", "data": {"train": f"{LEXNAMES}/train.jsonl", "test": f"{LEXNAMES}/test.jsonl",
                                                 "validation": f"{LEXNAMES}/validation.jsonl", "labels": labels}}
              for name, labels in (("A", ["noun.plant"]), ("B", ["noun.food"]))},
    "stages": [{"tasks": ["A"], "steps": 2}, {"tasks": ["B"], "steps": 2}],
}
STAGED_KEYS = sorted(set(flatten(to_dict(validate(STAGED_BASE)))) | {
    "stages", "stages.0.tasks", "stages.1.tasks", "stages.1.guard", "stages.1.guard.task", "stages.1.guard.max_drop",
    "stages.1.ewc.tasks", "stages.1.replay.ratio", "stages.2", "tasks.C", "tasks.B.data.test", "eval.mixed_splits",
    "branch_from"})
# Mostly values of the right shape, so the cross-section checks (stages, guards, splits) are reached.
staged_values = st.one_of(values, st.sampled_from(["A", "B", "C", ["A"], ["A", "B"], {"A": 1.0}, [], {}, None, 0.1,
                                                   ["noun.plant"], ["noun.food", "noun.plant"], True]),
                          st.sampled_from([{"task": "A", "max_drop": 0.1}, {"task": "B", "max_drop": 0.1}, 1, 2]),
                          st.lists(st.fixed_dictionaries({"tasks": st.sampled_from([["A"], ["B"], ["C"], []]),
                                                          "steps": st.integers(-1, 3)}), max_size=3))
staged_keys = st.one_of(st.sampled_from(STAGED_KEYS), st.sampled_from(
    ["stages", "stages.1.guard", "stages.1.tasks", "tasks.B.data.labels", "tasks.B.data.test", "tasks.A.data.validation",
     "eval.mixed_splits", "heads", "stages.1.ewc.tasks", "stages.1.replay.ratio"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(staged_keys, staged_values), max_size=3))
def test_staged_configs_load_or_fail_in_one_line(changes):
    tree = json.loads(json.dumps(STAGED_BASE))
    for dotted, value in changes:
        try:
            _set_path(tree, dotted.split("."), value, "fuzz")
        except TenureError:
            continue  # an override that names no place in the tree: refused on its own
    try:
        cfg = validate(tree, "fuzz.yaml")
    except TenureError as error:
        assert one_line(error), str(error)
    else:
        json.dumps(to_dict(cfg), allow_nan=False)


overrides = st.lists(st.sampled_from(["ewc.lambda=10", "optim.lr=1e-4", "replay.ratio=0.2", "replay.ratio=2",
                                     "nope=1", "stages.1.steps=3", "stages=[]", "tasks.B.data.test=null", "optim.lr=1e-4",
                                     "ewc.lambda=10", "x"]),
                     max_size=2)
methods = st.dictionaries(st.sampled_from(["naive", "ewc", "replay"]), overrides, min_size=1, max_size=2)
study_trees = st.fixed_dictionaries({
    "base": st.sampled_from(["base.yaml"] * 6 + ["missing.yaml", 3, None]),
    "methods": st.one_of(methods, methods, methods, st.dictionaries(st.sampled_from(["bad name", ""]), overrides),
                         values)},
    optional={"grid": st.one_of(st.dictionaries(st.sampled_from(["optim.lr", "stages.1.steps", "nope"]),
                                                st.lists(st.one_of(scalars, st.sampled_from([1e-4, 3])), max_size=2),
                                                max_size=2), values),
              "seeds": st.one_of(st.integers(-1, 2), st.integers(-1, 2), scalars)})
# Trees of the right shape reach the runs' config checks; the rest try every key with any value.
study_trees = st.one_of(study_trees, study_trees, study_trees, st.dictionaries(st.sampled_from(
    ["base", "methods", "grid", "seeds", "out", "exclude", "seed_keys", "pareto", "grid_plot", "x"]), values))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(study_trees)
def test_study_files_plan_or_fail_in_one_line(tmp_path, tree):
    from tenure.engine.study.config import load_study, plan_runs
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(STAGED_BASE))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    try:
        runs = plan_runs(load_study(path), path, tmp_path / "out")
        for run in runs[:4]:  # each run's config is checked as `tenure train` would
            load_config(run.command[4], list(run.command[5:]))
    except TenureError as error:
        assert one_line(error), str(error)
