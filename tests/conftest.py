"""Test session setup: 8 simulated CPU devices, so mesh tests run on one machine; the shared
`head_rows` fixture."""
import itertools
import os
import pathlib
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Compiling dominates these tiny-model tests; XLA's cheapest backend level cuts it ~3x on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

# The `tenure` runs the tests start share one compilation cache in the temp directory, not the
# user's ~/.cache (the suite compiles the same tiny and MiniLM steps in many runs).
os.environ.setdefault("TENURE_COMPILATION_CACHE",
                      os.path.join(tempfile.gettempdir(), f"tenure-tests-xla-{os.getuid()}"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def head_rows():
    """`head_rows(source, rows, out)`: writes the first `rows` lines of the repository file
    `source` (a JSONL split) to `out` and returns `out`: the tests' short validation and test splits."""
    def head(source: str | pathlib.Path, rows: int, out: pathlib.Path) -> pathlib.Path:
        with open(ROOT / source) as lines:
            out.write_text("".join(itertools.islice(lines, rows)))
        return out
    return head


# The longest files first. `--dist loadfile` hands files to the workers in collection order: a long
# file started last would run alone at the end while the other worker idles. `make test-long`
# (`--dist load`) starts with the longest real-model tests: SmolLM2's bf16 study (skipped without
# bf16 instructions), then the studies' headlines. In `make test` (real-model tests of minutes left
# out) the CLI-heavy files lead (`--durations=0`, AVX2 Zen 3, cold cache: 687 s, then 157-191 s).
LONGEST_FIRST = ("test_smollm2_forgetting.py", "test_forgetting_studies.py", "test_continual.py",
                 "test_task_configs.py", "test_lora_checkpoint.py", "test_safety_runs.py", "test_run_safety.py",
                 "test_scan_layers.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
