"""tpu/launch.sh and scripts/slurm/tenure.sbatch: --dry-run prints exactly what would run;
the SLURM task command then really starts two tenure processes; both scripts shellcheck clean."""
import itertools
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}  # no gcloud, no srun, no scontrol


def _run(script, *args, **env):
    return subprocess.run(["bash", str(ROOT / script), *args], env={**BASE_ENV, **env}, capture_output=True,
                          text=True, timeout=60)


def test_tpu_launch_dry_run_prints_every_gcloud_command():
    env = dict(TPU_NAME="tenure-a", ZONE="us-east5-a", ACCELERATOR="v5p-64")
    out = _run("tpu/launch.sh", "--dry-run", "create", **env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm create tenure-a --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 "
        "--zone=us-east5-a"]
    queued = _run("tpu/launch.sh", "--dry-run", "create", QUEUED="1", SPOT="1", PROJECT="p1", **env)
    assert queued.stdout.splitlines() == [
        "gcloud compute tpus queued-resources create tenure-a-qr --node-id=tenure-a --accelerator-type=v5p-64 "
        "--runtime-version=v2-alpha-tpuv5 --spot --zone=us-east5-a --project=p1"]
    assert _run("tpu/launch.sh", "--dry-run", "status", QUEUED="1", **env).stdout.splitlines() == [
        "gcloud compute tpus queued-resources describe tenure-a-qr --zone=us-east5-a"]
    assert _run("tpu/launch.sh", "--dry-run", "delete", QUEUED="1", **env).stdout.splitlines() == [
        "gcloud compute tpus queued-resources delete tenure-a-qr --force --quiet --zone=us-east5-a"]
    ship = _run("tpu/launch.sh", "--dry-run", "ship", **env).stdout.splitlines()
    assert [shlex.split(line)[:5] for line in ship] == [
        ["git", "archive", "--format=tar.gz", "-o", "/tmp/tenure.tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    run = _run("tpu/launch.sh", "--dry-run", "run", "configs/x.yaml", "run_dir=runs/a b", "mesh.fsdp=-1",
               TENURE_HANG_TIMEOUT="30", **env)
    argv = shlex.split(run.stdout)
    assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tenure-a", "--worker=all"]
    assert argv[-1] == "--zone=us-east5-a"
    remote = argv[7].removeprefix("--command=")
    assert remote.startswith("cd ~/tenure && TENURE_DISTRIBUTED=1 TENURE_HANG_TIMEOUT=30 .venv/bin/tenure train ")
    # The worker's shell sees the overrides as the user typed them (the space stays inside one).
    assert shlex.split(remote.split(" train ", 1)[1]) == ["configs/x.yaml", "run_dir=runs/a b", "mesh.fsdp=-1"]
    pre = shlex.split(_run("tpu/launch.sh", "--dry-run", "preflight", "configs/x.yaml", **env).stdout)
    assert pre[7].endswith(".venv/bin/tenure launch --preflight configs/x.yaml")
    missing = _run("tpu/launch.sh", "--dry-run", "create", ZONE="z")
    assert missing.returncode != 0 and "set TPU_NAME" in missing.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_dry_run_env_and_task_lines():
    out = _run("scripts/slurm/tenure.sbatch", "--dry-run", "train", "configs/q.yaml", "mesh.fsdp=-1",
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NTASKS="16", SLURM_NNODES="2", TENURE_PER_GPU="1",
               TENURE_ROOT="/home/u/tenure")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:8] == [
        "export JAX_COORDINATOR_ADDRESS=gpu07:8476", "export JAX_NUM_PROCESSES=16",
        "export TENURE_HANG_TIMEOUT=120", "export TENURE_PER_GPU=1", "export TENURE_ROOT=/home/u/tenure",
        "export TENURE_BIN=.venv/bin/tenure", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
        "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"]
    srun = shlex.split(lines[8])
    assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "--ntasks=16", "bash", "-c"]
    assert srun[6:] == ["tenure", "train", "configs/q.yaml", "mesh.fsdp=-1"]
    assert lines[9] == "task 0: JAX_PROCESS_ID=0 CUDA_VISIBLE_DEVICES=0"
    assert lines[-1] == "task 15: JAX_PROCESS_ID=15 CUDA_VISIBLE_DEVICES=7"  # rank 15 = node 1, GPU 7
    outside = _run("scripts/slurm/tenure.sbatch", "train", "c.yaml")
    assert outside.returncode != 0 and "not inside a SLURM allocation" in outside.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_slurm_task_command_starts_a_two_process_job(tmp_path):
    """The srun task command the dry run prints, run for ranks 0 and 1 on this host: a real
    2-process `tenure launch --preflight` joins through the coordinator the script chose."""
    for split, n in (("train", 64), ("validation", 16)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(itertools.islice(open(ROOT / f"data/wordnet_lexnames/{split}.jsonl"), n)))
    tenure = tmp_path / "tenure"
    tenure.write_text(f"#!/bin/sh\nexec {sys.executable} -m tenure.engine.cli \"$@\"\n")
    tenure.chmod(0o755)
    port = _free_port()
    args = ["launch", "--preflight", "configs/tasks/seq_cls.yaml", f"model.path={ROOT / 'tests/fixtures/bert/seq_cls'}",
            f"run_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'train.jsonl'}",
            f"data.validation={tmp_path / 'validation.jsonl'}", "data.test=null", "data.batch_size=8"]
    out = _run("scripts/slurm/tenure.sbatch", "--dry-run", *args, SLURM_JOB_NODELIST="127.0.0.1",
               SLURM_NTASKS="2", SLURM_NNODES="1", JAX_PORT=str(port), TENURE_ROOT=str(ROOT), TENURE_BIN=str(tenure))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    exported = dict(line.removeprefix("export ").split("=", 1) for line in lines if line.startswith("export "))
    assert exported["JAX_COORDINATOR_ADDRESS"] == f"127.0.0.1:{port}"
    task = shlex.split(next(line for line in lines if line.startswith("srun ")))[3:]  # bash -c TASK tenure ARGS
    env = {**os.environ, **exported, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2"}
    procs = [subprocess.Popen(task, env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-2000:]
    assert "preflight (2 processes, 4 devices):" in results[0][0]
    assert "sum over 4 devices = 6 (expected 6)" in results[0][0]


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
    out = subprocess.run(["shellcheck", "tpu/launch.sh", "scripts/slurm/tenure.sbatch"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
