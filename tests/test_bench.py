"""`tenure bench`: config loading, synthetic batches, the model-FLOPs formula, and one end-to-end
run on a tiny fixture model (values checked, never timings)."""
import json
from pathlib import Path

import numpy as np
import pytest

from tenure.engine.tools.bench import load_bench_config
from tenure.engine.cli import main
from tenure.engine.tools.bench_setup import BenchConfig, build_bench, model_flops, synthetic_batches
from tenure.engine.runtime.xla_env import SPEED_FLAGS, host_description
from tenure.models.errors import TenureError

ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = ROOT / "tests" / "fixtures" / "bert" / "seq_cls"
TINY_GPT2 = ROOT / "tests" / "fixtures" / "gpt2"


@pytest.fixture
def restore_compilation_cache():
    """`tenure bench` turns the persistent compilation cache on for its process; put the test
    session's settings back afterwards."""
    import jax
    from jax._src import compilation_cache
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


def _write(tmp_path, model_dir, kind="seq_cls", extra=""):
    path = tmp_path / "bench.yaml"
    path.write_text(f"model: {{path: {model_dir}, init: random}}\ntask: {{kind: {kind}}}\n"
                    "optim: {name: adamw, lr: 1.0e-3}\n"
                    f"bench: {{batch_size: 8, length: 16, warmup: 1, steps: 2, rounds: 1, batches: 2}}\n{extra}")
    return path


def test_bench_section_and_overrides(tmp_path):
    cfg, bench = load_bench_config(str(_write(tmp_path, TINY_BERT)), ["bench.length=8", "model.dtype=bfloat16"])
    assert (bench.length, bench.batch_size, cfg.model.dtype) == (8, 8, "bfloat16")
    path = _write(tmp_path, TINY_BERT)
    with pytest.raises(TenureError) as error:
        load_bench_config(str(path), ["bench.lenght=8"])
    assert str(error.value) == f"{path}: unknown config key 'bench.lenght'"


def test_synthetic_batches_shapes_and_padding():
    bench = BenchConfig(batch_size=3, length=10, real_tokens=0.5, batches=2)
    lm = synthetic_batches(bench, "causal_lm", vocab_size=50)
    assert len(lm) == 2 and lm[0]["input_ids"].shape == (3, 10)
    assert lm[0]["attention_mask"].sum() == 15
    assert np.all(lm[0]["labels"][:, 5:] == -100) and np.all(lm[0]["labels"][:, :5] == lm[0]["input_ids"][:, :5])
    cls = synthetic_batches(BenchConfig(batch_size=3, length=10, num_labels=4), "seq_cls", vocab_size=50)
    assert cls[0]["labels"].shape == (3,) and cls[0]["labels"].max() < 4 and cls[0]["input_ids"].min() >= 4
    mlm = synthetic_batches(BenchConfig(batch_size=16, length=64, real_tokens=0.5), "mlm", vocab_size=50)[0]
    labelled = mlm["labels"] != -100
    assert not labelled[:, 32:].any() and 0.05 < labelled[:, :32].mean() < 0.3
    assert np.all(mlm["labels"][labelled] == mlm["input_ids"][labelled])


def test_model_flops_is_6NT_plus_attention_and_shrinks_when_frozen(tmp_path):
    path = _write(tmp_path, TINY_BERT)
    cfg, bench = load_bench_config(str(path), [])
    b = build_bench(cfg, bench, path)
    flops = model_flops(b.arch, b.state.params, b.trainability, "seq_cls", 8, 16)
    layers, d, tokens = b.arch.num_hidden_layers, b.arch.hidden_size, 8 * 16
    n = flops["non_embedding_params"]
    assert flops["total"] == pytest.approx(6 * n * tokens + 12 * layers * 16 * d * tokens)
    cfg_head, _ = load_bench_config(str(path), ["trainable.mode=head"])
    h = build_bench(cfg_head, bench, path)
    head = model_flops(h.arch, h.state.params, h.trainability, "seq_cls", 8, 16)
    assert head["attention"] == pytest.approx(4 * layers * 16 * d * tokens)  # forward only
    assert head["total"] < flops["total"] / 2.5


def test_bench_runs_end_to_end_with_a_variant_and_prints_json_lines(tmp_path, capsys, restore_compilation_cache):
    path = _write(tmp_path, TINY_GPT2, kind="causal_lm")
    assert main(["bench", str(path), "--no-peak", "--cache-dir", str(tmp_path / "cache"), "--ab", "trainable.mode=last_n"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("BENCH ")]
    assert len(lines) == 2
    record, head = (json.loads(line[len("BENCH "):]) for line in lines)
    assert head["trainable"] == "last_n" and head["trainable_params"] < record["trainable_params"]
    assert head["speed_ratio_vs_A"] == pytest.approx(record["step_p50_s"] / head["step_p50_s"])
    assert head["model_flops_per_step"] < record["model_flops_per_step"]
    assert record["steps_timed"] == 2 and record["batch_size"] == 8 and record["length"] == 16
    assert record["tokens_per_s_padded"] == pytest.approx(128 / record["step_p50_s"])
    assert "lm_head" in record["model_flops_terms"] and record["xla_flops_per_step"] > 0
    assert np.isfinite(record["final_loss"]) and "mfu" not in record


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or "cpu family" not in Path("/proc/cpuinfo").read_text(),
                    reason="x86 Linux: /proc/cpuinfo names the family and the flags")
def test_the_host_line_names_the_cpu_family_and_the_instruction_sets_that_set_its_speed():
    """Two VMs both called "AMD EPYC" (Zen 3 with AVX2, Zen 5 with AVX512-BF16) run the step at
    different speeds and with different dot paths: a bench record must tell them apart."""
    cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    field = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in cpu.splitlines() if ":" in line)}
    line = host_description()
    assert line.startswith(f"{field['model name']} (family {field['cpu family']} model {field['model']}; ")
    named = set(line.split("; ", 1)[1].split(")")[0].split())
    assert named == ({f for f in SPEED_FLAGS if f in field["flags"].split()} or {"no", "avx2"})


def _bench_lines(out: str) -> list[dict]:
    return [json.loads(line[len("BENCH "):]) for line in out.splitlines() if line.startswith("BENCH ")]


def _durations(record: dict, side: str) -> tuple[list[float], list[float]]:
    """(durations of every step but the first of each block, durations of those first steps)."""
    blocks = [b for b in record["schedule"] if b["side"] == side]
    return ([end - start for b in blocks for start, end in b["spans"][1:]],
            [end - start for b in blocks for start, end in b["spans"][:1]])


def test_sides_alternate_in_blocks_whose_first_step_is_not_timed_and_the_load_is_reported(
        tmp_path, capsys, restore_compilation_cache):
    path = _write(tmp_path, TINY_GPT2, kind="causal_lm")
    assert main(["bench", str(path), "--no-peak", "--cache-dir", str(tmp_path / "cache"), "bench.rounds=3",
                 "--max-load=-1", "--ab", "model.dropout=0.0"]) == 0  # a limit any load exceeds
    captured = capsys.readouterr()
    record, variant = _bench_lines(captured.out)
    schedule = record["schedule"]
    assert [(b["side"], b["round"]) for b in schedule] == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A", 2), ("B", 2)]
    assert all(len(b["spans"]) == 2 + 1 for b in schedule)  # bench.steps=2 timed after one untimed
    starts_ends = [t for b in schedule for span in b["spans"] for t in span]
    assert starts_ends == sorted(starts_ends)  # one block after the other, steps back to back
    for r, side in ((record, "A"), (variant, "B")):
        timed, firsts = _durations(record, side)
        assert r["steps_timed"] == len(timed) == 6 and (r["rounds"], r["block_steps"]) == (3, 2)
        assert r["step_p50_s"] == pytest.approx(np.median(timed))
        assert r["step_p5_s"] <= r["step_p50_s"] <= r["step_p95_s"] <= max(timed)
        assert r["first_of_block_p50_s"] == pytest.approx(np.median(firsts))
        for key in ("load_average_start", "load_average_end"):
            assert len(r[key]) == 3 and all(isinstance(x, float) and x >= 0 for x in r[key])
    assert "load average (1 / 5 / 15 min): start " in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: the host's 1-minute load")]
    assert len(warnings) == 2 and "at start (above -1" in warnings[0] and "at end (above -1" in warnings[1]


def test_alone_check_needs_torch_and_variants_share_the_block_schedule(tmp_path, capsys):
    path = _write(tmp_path, TINY_BERT)
    assert main(["bench", str(path), "--alone-check"]) == 2
    assert "--alone-check compares against PyTorch alone: it needs --compare torch" in capsys.readouterr().err
    assert main(["bench", str(path), "--no-peak", "--ab", "bench.steps=5"]) == 2
    assert "--ab variant B: bench.steps and bench.rounds set the schedule" in capsys.readouterr().err


def test_a_length_past_the_position_table_is_refused_before_anything_is_built(tmp_path, capsys):
    """As training refuses such a data.max_length: past the table the gather reads NaN (a step
    that is not the model's), or the step runs out of memory."""
    path = _write(tmp_path, TINY_BERT)  # 40 positions
    assert main(["bench", str(path), "--no-peak", "--max-load", "inf", "bench.length=41"]) == 2
    assert capsys.readouterr().err.strip() == ("error: bench.length 41 is longer than the 40 positions this bert "
                                               "model has (its position table); set bench.length <= 40")
    assert main(["bench", str(path), "--no-peak", "--max-load", "inf", "--ab", "bench.length=100000"]) == 2
    assert "error: bench.length 100000 is longer than the 40 positions" in capsys.readouterr().err


@pytest.mark.slow  # three fresh processes (PyTorch twice, tenure alone once): about 30 s
@pytest.mark.skipif(__import__("tenure.models.parity").models.parity.torch_python() is None,
                    reason=".torch-venv (torch + transformers) is not installed: `make torch-env`")
def test_compare_torch_alternates_blocks_and_the_alone_check_prints_both_sides_alone(
        tmp_path, capsys, restore_compilation_cache):
    path = _write(tmp_path, TINY_BERT)
    assert main(["bench", str(path), "--no-peak", "--cache-dir", str(tmp_path / "cache"), "bench.rounds=2",
                 "bench.onednn=false",  # cacheable: the alone tenure process reads its step from the cache
                 "--max-load", "inf", "--compare", "torch", "--alone-check"]) == 0
    captured = capsys.readouterr()
    (record,) = _bench_lines(captured.out)
    # The PyTorch process stamps its steps on the same monotonic clock: its blocks sit between tenure's.
    assert [b["side"] for b in record["schedule"]] == ["A", "torch", "A", "torch"]
    starts_ends = [t for b in record["schedule"] for span in b["spans"] for t in span]
    assert starts_ends == sorted(starts_ends)
    timed, firsts = _durations(record, "torch")
    assert len(timed) == 4 and record["torch"]["step_p50_s"] == pytest.approx(np.median(timed))
    assert record["torch"]["first_of_block_p50_s"] == pytest.approx(np.median(firsts))
    alone = record["alone_check"]
    for side, alternating in (("tenure", record), ("torch", record["torch"])):
        assert alone[side]["step_p50_s"] > 0
        assert alone[side]["difference"] == pytest.approx(alternating["step_p50_s"] / alone[side]["step_p50_s"] - 1)
    assert alone["speed_ratio_vs_torch"] == pytest.approx(alone["torch"]["step_p50_s"] / alone["tenure"]["step_p50_s"])
    lines = captured.out.splitlines()
    (alone_row,) = [line for line in lines if line.startswith("alone, fresh process p50")]
    assert alone_row.split()[-2:] == [f"{alone['tenure']['step_p50_s']:.3f}", f"{alone['torch']['step_p50_s']:.3f}"]
    (difference_row,) = [line for line in lines if line.startswith("alternating / alone - 1")]
    assert difference_row.split()[-2:] == [f"{100 * alone[s]['difference']:+.1f}%" for s in ("tenure", "torch")]
    assert "warning" not in captured.err
