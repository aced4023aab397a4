"""eval.baseline_cache's claim: while one process of this host computes a start row, the others
wait for its scores instead of computing them too; a claim whose process is gone, or that comes
from another host, is not waited on; a failed computation releases its claim."""
import os
import socket
import subprocess
import threading

import pytest

from tenure.engine.tasks import baseline_cache


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch):
    monkeypatch.setattr(baseline_cache, "POLL_SECONDS", 0.05)


def computes(scores):
    calls = []
    return calls, lambda: calls.append(1) or scores


def test_the_first_run_computes_and_stores_the_next_reads(tmp_path):
    calls, compute = computes({"test/score": 0.5})
    assert baseline_cache.get_or_compute(str(tmp_path), "k", compute) == ({"test/score": 0.5}, False)
    assert baseline_cache.get_or_compute(str(tmp_path), "k", compute) == ({"test/score": 0.5}, True)
    assert calls == [1] and sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]  # no claim left


def test_a_run_waits_for_the_live_process_computing_the_same_scores(tmp_path, capsys):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "k.claim").write_text(f"{socket.gethostname()} pid {holder.pid}")
        calls, compute = computes({"test/score": 0.1})
        result = []
        waiter = threading.Thread(target=lambda: result.append(baseline_cache.get_or_compute(str(tmp_path), "k", compute)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not result      # still waiting: the holder has not stored yet
        baseline_cache.store(str(tmp_path), "k", {"test/score": 0.7})   # what the holder computed
        waiter.join(5)
        assert result == [({"test/score": 0.7}, True)] and calls == []
        assert f"waiting for {socket.gethostname()} pid {holder.pid}" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("claim_of", ["a process that is gone", "another host"])
def test_a_claim_of_a_gone_process_or_another_host_is_not_waited_on(tmp_path, claim_of):
    gone = subprocess.Popen(["true"])
    gone.wait()
    holder = f"{socket.gethostname()} pid {gone.pid}" if claim_of == "a process that is gone" else "elsewhere pid 1"
    (tmp_path / "k.claim").write_text(holder)
    calls, compute = computes({"test/score": 0.3})
    assert baseline_cache.get_or_compute(str(tmp_path), "k", compute) == ({"test/score": 0.3}, False)
    assert calls == [1] and not (tmp_path / "k.claim").exists()


def test_a_failed_computation_releases_its_claim(tmp_path):
    def fail():
        assert (tmp_path / "k.claim").read_text() == f"{socket.gethostname()} pid {os.getpid()}"
        raise RuntimeError("out of memory")
    with pytest.raises(RuntimeError, match="out of memory"):
        baseline_cache.get_or_compute(str(tmp_path), "k", fail)
    assert list(tmp_path.iterdir()) == []                # no claim for others to wait on, no scores


def test_lora_runs_of_any_seed_share_their_start_weights_digest():
    """A fresh adapter (lora_b = 0) adds exactly nothing, so LoRA runs that differ only in the
    seed's random lora_a start from one model: the key's digest zeroes such an lora_a. Its rank
    still counts (another program: the 5-seed SmolLM2 study's rank-4 start row was 113.1247
    on every seed, rank 16's 113.1712), and so does a trained adapter."""
    import numpy as np

    from tenure.engine.train.params import params_digest
    from tenure.models.lora import fresh_adapters_zeroed

    kernel = np.arange(16, dtype=np.float32).reshape(4, 4)

    def params(rank, seed=0, b=0.0):
        adapter = {"lora_a": np.random.default_rng(seed).normal(size=(4, rank)).astype(np.float32),
                   "lora_b": np.full((rank, 4), b, np.float32)}
        return {"backbone": {"query": {"kernel": kernel, **adapter}, "value": {"kernel": kernel}}}

    digest = lambda p: params_digest(fresh_adapters_zeroed(p))  # noqa: E731
    assert digest(params(4, seed=0)) == digest(params(4, seed=1))
    assert digest(params(4)) != digest(params(16))
    assert digest(params(4, seed=0, b=1e-3)) != digest(params(4, seed=1, b=1e-3))   # trained: as they are
    assert params_digest(params(4, seed=0)) != params_digest(params(4, seed=1))      # what the key used before
