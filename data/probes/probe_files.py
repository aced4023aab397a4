"""Absolute paths of the probes' data files, for the task YAMLs beside this file (`!function
probe_files.NAME` reads a name from this module). lm-eval hands `data_files` to
datasets.load_dataset, which reads a relative path from the current directory: these paths make
the tasks work from any directory."""
from pathlib import Path

HERE = Path(__file__).resolve().parent
capitals_train = str(HERE / "capitals" / "train.jsonl")
capitals_test = str(HERE / "capitals" / "test.jsonl")
kjv_test = str(HERE / "kjv" / "test.jsonl")
format_test = str(HERE / "format" / "test.jsonl")
