"""TensorBoard logger: events read back with TensorBoard's own reader, exact steps and values."""
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tenure.engine.runtime.tblog import TBLogger


def read_events(logdir) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_scalars_and_text_round_trip(tmp_path):
    with TBLogger(tmp_path, enabled=True) as tb:
        tb.scalars(1, {"train/loss": 2.5, "train/lr": 0.125})
        tb.scalars(2, {"train/loss": 1.75})
        tb.scalars(3, {})
        tb.text(0, "config", "| key | value |\n|---|---|\n| lr | 1e-4 |")
        tb.text(10, "eval/table", "accuracy 0.9 ± 0.01")
        tb.flush()
    (event_file,) = os.listdir(tmp_path)
    assert event_file.startswith("events.out.tfevents.")
    events = read_events(tmp_path)
    assert sorted(events.Tags()["scalars"]) == ["train/loss", "train/lr"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5), (2, 1.75)]
    assert [(e.step, e.value) for e in events.Scalars("train/lr")] == [(1, 0.125)]
    assert sorted(events.Tags()["tensors"]) == ["config", "eval/table"]
    (config_event,) = events.Tensors("config")
    assert config_event.step == 0
    assert config_event.tensor_proto.string_val == [b"| key | value |\n|---|---|\n| lr | 1e-4 |"]
    (table_event,) = events.Tensors("eval/table")
    assert (table_event.step, table_event.tensor_proto.string_val) == (10, ["accuracy 0.9 ± 0.01".encode()])
    plugin = events.SummaryMetadata("eval/table").plugin_data.plugin_name
    assert plugin == "text"


def test_disabled_logger_writes_nothing(tmp_path):
    logdir = tmp_path / "tb"
    tb = TBLogger(logdir, enabled=False)
    tb.scalars(1, {"train/loss": 1.0})
    tb.text(1, "config", "x")
    tb.flush()
    tb.close()
    assert not logdir.exists()


def test_primary_process_is_enabled_by_default(tmp_path):
    tb = TBLogger(tmp_path / "tb")  # the test session is process 0 of 1
    tb.scalars(5, {"a": 3.0})
    tb.close()
    assert [(e.step, e.value) for e in read_events(tmp_path / "tb").Scalars("a")] == [(5, 3.0)]
