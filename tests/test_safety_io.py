"""I/O failures (issue 10, item 6): one line naming the path and the cause, exit code 2,
nothing already written lost. Disk-full and read-only cases use a real small tmpfs."""
import json
import os
import shutil
from pathlib import Path

import pytest

from tenure.engine.cli import build_parser, main
from tenure.engine.config.schema import load_config
from tenure.models.errors import TenureError
from tenure.models.hf import check_export_target, export_hf, load_hf
from tests.fs_helpers import mounted_tmpfs

ROOT = Path(__file__).resolve().parents[1]
BERT = ROOT / "tests/fixtures/bert/seq_cls"


def tenure(capsys, *args) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def model_copy(tmp_path, name="m") -> Path:
    return Path(shutil.copytree(BERT, tmp_path / name))


@pytest.fixture(scope="module")
def tiny():
    cfg, backbone, head, tokenizer = load_hf(BERT)
    return cfg, {"backbone": backbone, "head": head}, tokenizer


def test_truncated_safetensors_is_one_line_exit_2(tmp_path, capsys):
    model = model_copy(tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err = tenure(capsys, "hf", "check", model)
    assert code == 2
    assert err.strip() == (
        f"error: {model}/model.safetensors: cannot read safetensors (Error while deserializing header: "
        "incomplete metadata, file not fully covered); the file is truncated, corrupt or not safetensors")


def test_missing_tokenizer_json(tmp_path):
    model = model_copy(tmp_path)
    (model / "tokenizer.json").unlink()
    with pytest.raises(TenureError) as err:
        load_hf(model)
    assert str(err.value) == (f"{model}/tokenizer.json: not found, and the other tokenizer files there "
                              "do not define a tokenizer")


@pytest.mark.parametrize("index, reason", [
    ({"metadata": {}}, "no 'weight_map' object (tensor name -> shard file)"),
    ({"weight_map": {"w": "../outside.safetensors"}},
     "weight_map['w']: shard '../outside.safetensors' is outside the model directory; refused"),
    ({"weight_map": {"w": "/etc/passwd"}}, "weight_map['w']: shard '/etc/passwd' is outside the model directory; refused"),
    ({"weight_map": {"w": 3}}, "weight_map['w']: expected a file name, got 3"),
    ([1, 2], "no 'weight_map' object (tensor name -> shard file)"),
])
def test_bad_shard_index(tmp_path, index, reason):
    model = model_copy(tmp_path)
    (model / "model.safetensors").rename(tmp_path / "outside.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(TenureError) as err:
        load_hf(model)
    assert str(err.value) == f"{model}/model.safetensors.index.json: {reason}"


def test_binary_config_files(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    code, err = tenure(capsys, "train", config)
    assert (code, err.strip()) == (
        2, f"error: {config}: not a text file (binary content), expected YAML")
    config.write_bytes(b"model: \x00\x01")
    with pytest.raises(TenureError, match=r"^.*run.yaml: invalid YAML \(unacceptable character #x0000: "
                                          r"special characters are not allowed\)$"):
        load_config(config)
    model = model_copy(tmp_path)
    (model / "config.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(TenureError, match=f"^{model}/config.json: not a text file \\(binary content\\), "
                                          "expected JSON$"):
        load_hf(model)


def test_export_refuses_existing_model_dir_unless_forced(tmp_path, tiny):
    cfg, params, tokenizer = tiny
    out = export_hf(tmp_path / "hf", cfg, params, "seq_cls", tokenizer, overwrite=False)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(TenureError, match=f"^export: {out} already holds an HF model; pass --force to replace it$"):
        export_hf(out, cfg, params, "seq_cls", tokenizer, labels=["a", "b"], overwrite=False)
    export_hf(out, cfg, params, "seq_cls", tokenizer, labels=["a", "b"], overwrite=True)
    assert json.loads((out / "config.json").read_text())["id2label"] == {"0": "a", "1": "b"}
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary or old directories left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    for force in (False, True):
        with pytest.raises(TenureError, match=f"^export: {tmp_path}/mine is not empty and is not an HF model "
                                              "directory; choose a new or empty directory$"):
            export_hf(tmp_path / "mine", cfg, params, "seq_cls", tokenizer, overwrite=force)
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]
    with pytest.raises(TenureError, match="exists and is not a directory"):
        check_export_target(tmp_path / "mine" / "thesis.tex")


def test_cli_export_refuses_before_restoring(tmp_path, tiny, capsys):
    cfg, params, tokenizer = tiny
    out = export_hf(tmp_path / "hf", cfg, params, "seq_cls", tokenizer)
    code, err = tenure(capsys, "export", "configs/tasks/seq_cls.yaml", "--checkpoint", tmp_path / "no-such-run",
                       "--out", out)
    assert (code, err.strip()) == (2, f"error: export: {out} already holds an HF model; pass --force to replace it")
    args = build_parser().parse_args(["export", "c.yaml", "--checkpoint", "r", "--out", "o", "--force"])
    assert args.force is True


def test_disk_full_at_export_leaves_the_old_export(tmp_path, tiny):
    cfg, params, tokenizer = tiny
    with mounted_tmpfs(tmp_path / "small", size="512k") as small:
        out = export_hf(small / "hf", cfg, params, "seq_cls")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        stat = os.statvfs(small)
        (small / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 40 * 1024))
        with pytest.raises(TenureError) as err:
            export_hf(out, cfg, params, "seq_cls", tokenizer, overwrite=True)
        message = str(err.value)
        assert message.startswith(f"export to {out} failed: ")
        assert message.endswith(f"{out}/model.safetensors: No space left on device; {out} was left as it was")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert sorted(os.listdir(small)) == ["filler", "hf"]  # the partial export was removed


def test_unwritable_out_is_one_line(tmp_path, tiny):
    cfg, params, tokenizer = tiny
    with mounted_tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(TenureError, match=f"^export: cannot write {ro}/hf: {ro}/.hf.tmp-.*: "
                                              "Read-only file system$"):
            export_hf(ro / "hf", cfg, params, "seq_cls", tokenizer)
