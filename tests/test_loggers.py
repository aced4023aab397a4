"""The run's loggers (engine/runtime/loggers.py): a tiny run logging to TensorBoard and, offline, to
Weights & Biases; the W&B scalars read back from the offline run's own file equal TensorBoard's
and the run's summary; a missing wandb package is one line naming the extra."""
import itertools
import json
import pathlib
import struct
import sys

import numpy as np
import pytest

from tenure.engine.config.schema import load_config
from tenure.engine.runtime.loggers import run_loggers
from tenure.engine.train.trainer import train
from tenure.models.errors import TenureError
from tests.test_tblog import read_events

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests/fixtures/bert/seq_cls"
BLOCK, HEADER = 32768, 7  # the .wandb file: LevelDB-log blocks; a 7-byte file header and record headers
FULL, LAST = 1, 4


def wandb_history(run_dir: pathlib.Path) -> list[dict]:
    """The history rows of the offline W&B run under `run_dir`, read from its `.wandb` file: LevelDB
    log framing (records split over 32 KiB blocks) around wandb's own protobuf `Record`s."""
    from wandb.proto.wandb_internal_pb2 import Record
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    at, chunk, rows = HEADER, b"", []
    while at + HEADER <= len(data):
        room = BLOCK - at % BLOCK
        if room < HEADER:  # a block's zero-padded tail
            at += room
            continue
        _, length, kind = struct.unpack("<IHB", data[at:at + HEADER])
        if kind == 0:
            break
        chunk += data[at + HEADER:at + HEADER + length]
        at += HEADER + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _scalars_by_tag(rows: list[dict], texts=("config",)) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)], leaving out wandb's own keys (`_step`, ...) and the fields of the
    media the `texts` tags logged (their size, hash)."""
    out: dict[str, list] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("_") or key == "step" or key.split("/")[0] in texts:
                continue
            out.setdefault(key, []).append((row["step"], value))
    return out


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb
    wandb.teardown()


def test_a_tiny_run_logs_the_same_scalars_to_tensorboard_and_wandb(tmp_path, offline):
    data = {}
    for split, rows in (("train", 64), ("validation", 16)):
        data[split] = tmp_path / f"{split}.jsonl"
        data[split].write_text("".join(itertools.islice(open(ROOT / f"data/wordnet_lexnames/{split}.jsonl"), rows)))
    run_dir = tmp_path / "run"
    cfg = load_config(ROOT / "configs/tasks/seq_cls.yaml", [
        f"model.path={TINY_BERT}", f"run_dir={run_dir}", f"data.train={data['train']}",
        f"data.validation={data['validation']}", "data.test=null", "data.batch_size=8", "data.eval_batch_size=16",
        "train.steps=3", "train.eval_every=3", "train.log_every=1", "checkpoint.every_steps=3",
        "logging.progress=false", "logging.wandb={project: tenure-test, mode: offline}"])
    summary = train(cfg)
    wandb = _scalars_by_tag(wandb_history(run_dir))
    events = read_events(run_dir / "tb")
    tensorboard = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert set(wandb) == set(tensorboard) and {"train/loss", "validation/accuracy", "final/validation/accuracy"} \
        <= set(wandb)
    for tag, points in tensorboard.items():  # TensorBoard holds float32
        assert [s for s, _ in wandb[tag]] == [s for s, _ in points], tag
        np.testing.assert_allclose([v for _, v in wandb[tag]], [v for _, v in points], rtol=1e-6, err_msg=tag)
    assert [s for s, _ in wandb["train/loss"]] == [1, 2, 3]
    assert [v for _, v in wandb["train/loss"]] == summary["train_loss"]  # the float64 values themselves


def test_a_missing_wandb_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as when not installed
    cfg = load_config(ROOT / "configs/tasks/seq_cls.yaml", ["logging.wandb={project: p}"])
    with pytest.raises(TenureError) as err:
        run_loggers(cfg.logging, tmp_path, {}, primary=True)
    assert str(err.value) == ("logging.wandb: the wandb package is not installed; install the extra: "
                              "pip install -e '.[wandb]'")


def test_only_the_primary_process_logs(tmp_path):
    cfg = load_config(ROOT / "configs/tasks/seq_cls.yaml", ["logging.wandb={project: p, mode: offline}"])
    loggers = run_loggers(cfg.logging, tmp_path, {}, primary=False)
    loggers.scalars(1, {"a": 1.0})
    loggers.close()
    assert loggers.loggers == [] and not any(tmp_path.iterdir())
