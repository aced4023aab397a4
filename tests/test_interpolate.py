"""`tenure interpolate` (engine/continual/interpolate.py) on one tiny staged run (the tiny BERT, stages A and
B): the curve's ends reproduce R's rows exactly, its files, the export of a chosen point, and the
refusals."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from tenure.engine.continual.interpolate import mix, parse_alphas
from tenure.models.errors import TenureError
from tests.cli_helpers import tenure
from tests.test_continual import CONFIG, data, staged_args  # noqa: F401  (data: the module fixture)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, data):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("staged")
    tenure("train", CONFIG, *staged_args(run_dir, data, 2, 6, "heads=per_task", "eval.kl_to_start=true"))
    return run_dir


def curve_of(run_dir, *args):
    result = tenure("interpolate", str(run_dir), *args)
    return result, json.loads((run_dir / "interpolation" / f"stage{args[args.index('--stage') + 1] if '--stage' in args else 1}.json").read_text())


@pytest.mark.slow
def test_curve_ends_reproduce_the_rows_of_R_exactly(staged_run):
    R = json.loads((staged_run / "forgetting.json").read_text())
    result, record = curve_of(staged_run, "--alphas", "0,0.5,1")
    rows = {r["alpha"]: r["scores"] for r in record["rows"]}
    assert record["start"] == "end of stage 0" and record["own_tasks"] == ["B"]
    assert [rows[0.0][t] for t in ("A", "B")] == R["R"][0]      # theta(0): the weights after A
    assert [rows[1.0][t] for t in ("A", "B")] == R["R"][1]      # theta(1): the weights after B
    assert rows[0.5] != rows[0.0] and rows[0.5] != rows[1.0]
    csv_rows = (staged_run / "interpolation" / "stage1.csv").read_text().splitlines()
    assert csv_rows[0] == "alpha,A,B" and len(csv_rows) == 4 and csv_rows[3].startswith("1.0,")
    assert (staged_run / "interpolation" / "stage1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "alpha 0.5:" in result.stdout
    # stage 0: from the run's starting model (pretrained, fresh heads) to the weights after A
    _, first = curve_of(staged_run, "--stage", "0", "--alphas", "0,1")
    assert [first["rows"][0]["scores"][t] for t in ("A", "B")] == R["start_row"]
    assert [first["rows"][1]["scores"][t] for t in ("A", "B")] == R["R"][0]
    # --as-run: the run as it would end at theta(0.5), which a study tabulates like a trained run
    as_run = staged_run.parent / "as_run"
    tenure("interpolate", str(staged_run), "--alphas", "0.5", "--as-run", str(as_run))
    made, summary = (json.loads((as_run / name).read_text()) for name in ("forgetting.json", "summary.json"))
    assert made["R"] == [R["R"][0], [rows[0.5][t] for t in ("A", "B")]]
    assert made["start_row"] == R["start_row"] and made["stage_ends"] == R["stage_ends"]
    assert made["interpolated"]["alpha"] == 0.5 and made["interpolated"]["start"] == "end of stage 0"
    end = made["curves"][-1]
    assert end["stage"] == 1 and end["step"] == R["stage_ends"][1]
    assert set(end["scores"]) == {"A", "B"} and end["scores"]["A"] != next(
        c for c in R["curves"] if c["stage"] == 1 and c["step"] == R["stage_ends"][1])["scores"]["A"]
    assert "weight_distance" in R and not {"stability_gap", "kl_to_start", "weight_distance"} & set(made)
    assert all(c["stage"] == 0 for c in made["curves"][:-1])
    assert made["summary"]["bwt"] == pytest.approx(made["R"][1][0] - made["R"][0][0])
    assert summary["final"]["validation/A/accuracy"] == end["scores"]["A"]
    assert summary["final"]["test/B/accuracy"] == made["R"][1][1]


@pytest.mark.slow
def test_export_of_a_point_and_refusals(staged_run, tmp_path):
    """theta(1) exported equals the run's own export (its end), tensor for tensor (the curve test
    shows theta(0.5) scores differently from both ends)."""
    tenure("interpolate", str(staged_run), "--export", "1", "--out", str(tmp_path / "end"))
    run_end, end = (load_file(str(d / "model.safetensors")) for d in (staged_run / "hf", tmp_path / "end"))
    assert run_end.keys() == end.keys() and len(run_end) > 10
    for name in run_end:
        np.testing.assert_array_equal(end[name], run_end[name], err_msg=name)
    line = tenure("interpolate", str(staged_run), "--stage", "5", "--alphas", "0,1", check=False).stderr.strip()
    assert line.splitlines()[-1] == "error: interpolate: --stage 5: the run has finished stages 0..1"
    line = tenure("interpolate", str(staged_run), check=False).stderr.strip().splitlines()[-1]
    assert line == "error: interpolate: give --alphas (the curve) and/or --export ALPHA --out DIR"
    line = tenure("interpolate", str(staged_run), "--alphas", "0,1", "--out", str(tmp_path / "c"),
                  check=False).stderr.strip().splitlines()[-1]  # was ignored: the curve went to its default dir
    assert line == ("error: interpolate: --out is where --export ALPHA writes its weights; the curve's directory "
                    "is --out-dir")
    # --as-run never replaces a run's results: the source's own always refused, another's without --force
    before = (staged_run / "summary.json").read_bytes()
    refused = tenure("interpolate", str(staged_run), "--alphas", "0.5", "--as-run", str(staged_run), check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: interpolate --as-run {staged_run}: that is the source run; its results would be replaced by "
        "theta(a)'s; give another directory")
    other = tmp_path / "other"
    other.mkdir()
    (other / "forgetting.json").write_text("{}")
    refused = tenure("interpolate", str(staged_run), "--alphas", "0.5", "--as-run", str(other), check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].endswith(
        "it holds a run's forgetting.json; give a new directory, or --force to replace them")
    assert (staged_run / "summary.json").read_bytes() == before and (other / "forgetting.json").read_text() == "{}"
    line = tenure("interpolate", str(staged_run), "--alphas", "0,1", "--out-dir", str(other / "forgetting.json"),
                  check=False).stderr.strip().splitlines()[-1]
    assert line == f"error: interpolate --out-dir {other / 'forgetting.json'}: that is a file; give a directory"
    # an unfinished run (no summary.json) is refused
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    line = tenure("interpolate", str(unfinished), "--alphas", "0,1", check=False).stderr.strip().splitlines()[-1]
    assert line == f"error: interpolate: {unfinished} is not a finished run (no summary.json); finish it (rerun its " \
                   "`tenure train`) first"


def test_alphas_and_mix():
    assert parse_alphas("0,0.25,1") == [0.0, 0.25, 1.0]
    with pytest.raises(TenureError, match=r"--alphas '0,1.5': expected numbers in \[0, 1\]"):
        parse_alphas("0,1.5")
    with pytest.raises(TenureError, match="expected comma-separated numbers"):
        parse_alphas("0,a")
    start, end = {"w": np.array([1.0, -2.0], np.float32)}, {"w": np.array([3.0, 6.0], np.float32)}
    assert np.asarray(mix(start, end, 0.0)["w"]).tolist() == [1.0, -2.0]
    assert np.asarray(mix(start, end, 1.0)["w"]).tolist() == [3.0, 6.0]
    assert np.asarray(mix(start, end, 0.25)["w"]).tolist() == [1.5, 0.0]
