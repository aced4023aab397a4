"""TensorBoard event files written with the `tensorboard` package alone (no TensorFlow).

Only the primary process writes; on the others every method is a no-op, so callers need
no `if process_index == 0` of their own.
"""
import os
import time
from typing import Mapping

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TBLogger:
    """Scalars and text (config dumps, eval tables as markdown) for one run directory."""

    def __init__(self, logdir: str | os.PathLike, enabled: bool | None = None, flush_secs: int = 30):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.logdir = str(logdir)
        self._writer = EventFileWriter(self.logdir, flush_secs=flush_secs) if self.enabled else None

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        summary = summary_pb2.Summary(value=values)
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One point per tag, e.g. {"train/loss": 0.41, "train/lr": 1e-4}."""
        if not self.enabled or not values:
            return
        self._write(step, [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()
        ])

    def text(self, step: int, tag: str, text: str) -> None:
        """Markdown text, shown in TensorBoard's Text tab."""
        if not self.enabled:
            return
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
        )
        plugin = text_metadata.create_summary_metadata(display_name=None, description=None)
        self._write(step, [summary_pb2.Summary.Value(tag=tag, metadata=plugin, tensor=tensor)])

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()

    def __enter__(self) -> "TBLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
