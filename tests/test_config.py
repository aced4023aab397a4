"""Config loading: YAML + overrides into typed sections; every mistake is one clear line."""
import pytest

from tenure.engine.config.schema import load_config
from tenure.models.errors import TenureError

BASE = """
run_dir: runs/x
model: {path: minilm}
task: {kind: seq_cls}
data: {format: text_label, train: data/wordnet_lexnames/train.jsonl}
train: {steps: 10}
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    return path


def test_yaml_and_overrides_are_typed(cfg_file):
    cfg = load_config(cfg_file, ["train.steps=25", "optim.lr=3e-5", "mesh.data=2",
                                 "trainable.mode=last_n", "trainable.last_n=2", "data.batch_size=8"])
    assert cfg.train.steps == 25 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.mesh.data == 2
    assert (cfg.trainable.mode, cfg.trainable.last_n) == ("last_n", 2)
    assert cfg.data.batch_size == 8
    assert cfg.model.path == "minilm" and cfg.task.kind == "seq_cls"


@pytest.mark.parametrize("override, message", [
    ("train.stpes=3", "unknown config key 'train.stpes'"),
    ("train.steps=abc", "config key 'train.steps'"),
    ("task.kind=poetry", "config key 'task.kind'"),
    ("optim.lr=-1", "config key 'optim.lr'"),
    ("nonsense", "expected key.sub=value"),
    ("run_dir.x=1", "'run_dir' is a value, not a section"),
    ("train.seed=-1", "config key 'train.seed': Input should be greater than or equal to 0"),
    ("train.seed=99999999999999999999999", "config key 'train.seed': Input should be less than or equal to 2147483647"),
    ("data.seed=-1", "config key 'data.seed'"),
    ("model.path=", "config key 'model.path': String should have at least 1 character"),
    ("optim.momentum=0.9", "optim.momentum applies to sgd, not adamw (adamw: optim.betas)"),
    ("data.length_buckets=[]", "config key 'data.length_buckets'"),
    ("checkpoint.enabled=false", "config key 'checkpoint.enabled': false, but this run ends on its best validation "
                                 "checkpoint (a single-task run), which it would not have"),
    ("data.labels=[noun.plant, noun.plant, noun.food]", "config key 'data.labels': noun.plant listed twice"),
    ("checkpoint.dir=[/tmp/a", "override 'checkpoint.dir=[/tmp/a': invalid YAML"),
    ("data.train={a: 1", "override 'data.train={a: 1': invalid YAML"),
])
def test_bad_keys_and_values_name_the_key(cfg_file, override, message):
    with pytest.raises(TenureError) as err:
        load_config(cfg_file, [override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_missing_section_and_missing_file(tmp_path, cfg_file):
    broken = tmp_path / "b.yaml"
    broken.write_text("model: {path: minilm}\ntask: {kind: seq_cls}\n")
    with pytest.raises(TenureError, match="missing config key 'data'"):
        load_config(broken)
    with pytest.raises(TenureError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(TenureError, match=f"^config file {tmp_path} is a directory; give the YAML file$"):
        load_config(tmp_path)
    # a value that is not YAML and not meant as a list or mapping stays a string
    assert load_config(cfg_file, ["run_dir=*runs/x"]).run_dir == "*runs/x"


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: [unclosed\ntask: {kind: seq_cls}\n")
    with pytest.raises(TenureError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_model_attention_reaches_the_task_model(cfg_file):
    from tenure.engine.train.build import model_for
    from tenure.models.bert import BertConfig
    cfg = load_config(cfg_file, ["model.attention=xla"])
    assert model_for(cfg, BertConfig(num_hidden_layers=1), cfg.task, 3, None).attention == "xla"
    assert load_config(cfg_file).model.attention == "einsum"
    with pytest.raises(TenureError, match="config key 'model.attention'"):
        load_config(cfg_file, ["model.attention=flash"])


@pytest.mark.parametrize("flags, platforms, expected", [
    ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "", "bfloat16"),   # AMX Xeon
    ({"avx2", "avx512f", "avx512_bf16"}, "cpu", "bfloat16"),            # Zen 4 / 5
    ({"avx2"}, "", "float32"),                                          # Zen 3: bf16 emulated
    ({"avx2"}, "cuda,cpu", "bfloat16"),                                 # a GPU run on that host
    ({"avx2"}, "cpu", "float32"),
])
def test_auto_dtype_is_resolved_once_from_the_host(cfg_file, monkeypatch, flags, platforms, expected):
    """model.dtype: auto becomes a concrete dtype when the config is read, so every later reader
    (the step, the checkpoint's config, a resume's comparison) sees which one ran."""
    from tenure.engine.runtime import xla_env

    monkeypatch.setattr(xla_env, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert load_config(cfg_file, ["model.dtype=auto"]).model.dtype == expected
    assert load_config(cfg_file, ["model.dtype=float32"]).model.dtype == "float32"  # explicit stays
    with pytest.raises(TenureError, match="config key 'model.dtype'"):
        load_config(cfg_file, ["model.dtype=fp16"])


def test_an_override_of_one_task_leaves_the_tasks_sharing_its_yaml_anchor_alone(tmp_path):
    """`data: *d` makes two tasks' data one YAML node: an override of one task's key is that task's."""
    path = tmp_path / "anchors.yaml"
    path.write_text("model: {path: minilm}\n"
                    "tasks:\n"
                    "  A: {kind: seq_cls, data: &d {train: a.jsonl, batch_size: 8, clean: {whitespace: true}}}\n"
                    "  B: {kind: seq_cls, data: *d}\n"
                    "  C: {kind: seq_cls, data: {<<: *d, train: c.jsonl}}\n"
                    "stages: [{tasks: [A], steps: 2}, {tasks: [B], steps: 2}, {tasks: [C], steps: 2}]\n")
    cfg = load_config(path, ["tasks.A.data.batch_size=4", "tasks.B.data.clean.min_length=30"])
    assert [cfg.tasks[t].data.batch_size for t in "ABC"] == [4, 8, 8]
    assert [cfg.tasks[t].data.clean.min_length for t in "ABC"] == [0, 30, 0]


def test_a_home_relative_run_dir_is_the_home_directory(cfg_file):
    import os
    cfg = load_config(cfg_file, ["run_dir=~/runs/x", "checkpoint.dir=~/ckpts"])
    assert cfg.run_dir == os.path.expanduser("~/runs/x") and not cfg.run_dir.startswith("~")
    assert str(cfg.checkpoint.resolved_dir(cfg.run_dir)) == os.path.expanduser("~/ckpts")
