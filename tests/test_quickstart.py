"""The quickstart (configs/quickstart.yaml, here on the tiny BERT for 4 steps): a one-stage run
of the lexname task beside the retrieval probe it never trains. It trains as the single-task
config of the same task (configs/tasks/seq_cls.yaml) does, keeps its best checkpoint as that one
does, and ends on a start -> end table of both and the methods line quoting study 2."""
import json
import pathlib
import re

import numpy as np
import pytest

from tenure.engine.continual.report import KEEPING_IT
from tests.cli_helpers import tenure

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"


@pytest.fixture(scope="module")
def small(tmp_path_factory, head_rows):
    """Shorter validation and test splits of both datasets (training data: the real sets)."""
    d = tmp_path_factory.mktemp("data")
    return {f"{name}.{split}": head_rows(f"data/wordnet_{name}/{split}.jsonl", 64, d / f"{name}_{split}.jsonl")
            for name in ("lexnames", "retrieval") for split in ("validation", "test")}


# The tiny BERT, and an lr high enough that the kept (best) step need not be the last; fp32 as
# the single-task config (the quickstart's `auto` is bf16 on AMX hosts).
COMMON = [f"model.path={TINY_BERT}", "optim.lr=3e-3", "optim.warmup_ratio=0", "logging.progress=false",
          "train.eval_every=2", "model.dtype=float32"]


def _quickstart(run_dir, small, *extra):
    return tenure("train", "configs/quickstart.yaml", f"run_dir={run_dir}", *COMMON, "stages.0.steps=4",
                  *[f"tasks.{task}.data.{split}={small[f'{name}.{split}']}"
                    for task, name in (("lexnames", "lexnames"), ("embeddings", "retrieval"))
                    for split in ("validation", "test")], *extra)


@pytest.fixture(scope="module")
def quickstart(small, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("quickstart")
    return run_dir, _quickstart(run_dir, small)


def test_quickstart_ends_on_what_it_learned_and_what_it_forgot(quickstart):
    """The last table has the task's and the probe's start and end scores (R's), then the
    methods line when the probe fell; forgetting.png's curves have both at every eval."""
    run_dir, result = quickstart
    record = json.loads((run_dir / "forgetting.json").read_text())
    assert record["tasks"] == ["lexnames", "embeddings"]
    (start_task, start_probe), (end_task, end_probe) = record["start_row"], record["R"][-1]
    lines = result.stdout.splitlines()
    table = lines.index("test split, start -> end of the run")
    assert lines[table + 1].split() == ["the", "task", "lexnames", "(accuracy)",
                                        f"{start_task:.4f}", "->", f"{end_task:.4f}"]
    assert lines[table + 2].split() == ["what", "it", "knew", "embeddings", "(ndcg@10)",
                                        f"{start_probe:.4f}", "->", f"{end_probe:.4f}"]
    assert (lines[table + 3] == KEEPING_IT) == (end_probe < start_probe)
    # The curves forgetting.png draws: both tasks at the start and at every eval (steps 2, 4).
    assert [c["step"] for c in record["curves"]] == [0, 2, 4]
    assert all(isinstance(c["scores"][t], float) for c in record["curves"] for t in record["tasks"])
    assert (run_dir / "forgetting.png").stat().st_size > 0


def test_quickstart_trains_as_the_single_task_config_does(quickstart, small, tmp_path):
    """The same steps on the same batches, the same kept checkpoint and test scores: the probe
    beside the task changes nothing of its training but the compiled step's rounding (the
    one-stage run's step carries task ids and label masks: ~1e-7 relative)."""
    tenure("train", "configs/tasks/seq_cls.yaml", f"run_dir={tmp_path}", *COMMON, "train.steps=4",
           f"data.validation={small['lexnames.validation']}", f"data.test={small['lexnames.test']}")
    staged, single = (json.loads((run_dir / "summary.json").read_text()) for run_dir in (quickstart[0], tmp_path))
    assert len(staged["train_loss"]) == len(single["train_loss"]) == 4
    assert np.allclose(staged["train_loss"], single["train_loss"], rtol=1e-5, atol=0)
    assert staged["best_step"] == single["best_step"]
    for metric in ("accuracy", "f1_macro"):
        assert staged["final"][f"test/lexnames/{metric}"] == single["final"][f"test/{metric}"]
    assert staged["final"]["test/lexnames/loss"] == pytest.approx(single["final"]["test/loss"], rel=1e-5)


def test_the_methods_line_quotes_study_2():
    """Every number KEEPING_IT prints is in study 2's section of docs/forgetting.md."""
    docs = (ROOT / "docs/forgetting.md").read_text()
    study2 = docs[docs.index("## Study 2"):docs.index("## Study 3")]
    numbers = re.findall(r"\d\.\d{3}", KEEPING_IT)
    assert len(numbers) == 9
    assert [n for n in numbers if n not in study2] == []
