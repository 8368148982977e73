"""Data-parallel training on CPU: torchrun with 2 gloo processes on loopback trains a tiny
recipe; rank 0 alone writes; the EMA is checked identical on both ranks every epoch (the loop
raises otherwise); the 2-process checkpoint resumes in 1 process; the figures stay close to a
1-process run with the same global batch. Every process a test starts is stopped by its PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlt.server.launcher import free_port

# Augmentation off, so that a 2-process run and a 1-process run with 2 accumulation passes (the
# same shares of the same draw) differ only by the order of floating-point sums.
SETTINGS = ["batch_size=16", "threads=1", "augment.hflip_p=0"]
RECIPE = ["--config", "frontal_pcam", *[a for s in SETTINGS for a in ("--set", s)], "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.synth import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("ddp"), 80, seed=5, image_size=32)


def torchrun(launch: list[str], train: list[str], timeout: float = 240) -> list[subprocess.Popen]:
    """Start `torchrun LAUNCH -m cxrlt train TRAIN` (own process group, loopback only)."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", COLUMNS="200")
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "cxrlt", "train", *map(str, train)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def finish(processes: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    """Each process's output once it exited 0; every one still running is stopped by its PID."""
    outputs = []
    try:
        for process in processes:
            out, _ = process.communicate(timeout=timeout)
            assert process.returncode == 0, out[-3000:]
            outputs.append(out)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # torchrun and its workers: the group we started
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    return outputs


def loopback(nodes: int, per_node: int, port: int) -> list[str]:
    return [f"--nnodes={nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cxrlt-test"]


@pytest.mark.e2e
def test_two_gloo_processes_train_and_the_checkpoint_resumes_in_one(data, tmp_path):
    from training.loop import train
    from training.recipes import load_recipe

    out = tmp_path / "two"
    (log,) = finish([torchrun(loopback(1, 2, free_port()),
                              [*RECIPE, "--data", data, "--out", out, "--epochs", 2, "--stop-after-epoch", 1])])
    assert log.count("frontal_pcam epoch 1/2") == 1  # rank 0 alone logs
    assert sorted(p.name for p in out.iterdir()) == ["ensemble_frontal_pcam.metrics.csv", "ensemble_frontal_pcam.pt"]
    state = torch.load(out / "ensemble_frontal_pcam.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["processes"] == 2

    # one process, 2 accumulation passes of 8: the same shares of the same draw in the same steps
    recipe = load_recipe("frontal_pcam", assignments=[*SETTINGS, "accumulate_steps=2"])
    one = train(recipe, data, tmp_path / "one", epochs=2, stop_after_epoch=1, progress=False, log=lambda line: None)
    two = state["history"][0]
    assert two["step"] == one.final["step"]
    assert two["train_loss"] == pytest.approx(one.final["train_loss"], rel=1e-4)
    assert two["val_mAP"] == pytest.approx(one.final["val_mAP"], abs=1e-4)
    single = torch.load(one.checkpoint, map_location="cpu", weights_only=True)["ema_state_dict"]
    for key, value in state["ema_state_dict"].items():
        assert torch.allclose(value.float(), single[key].float(), atol=1e-4), key

    # the 2-process checkpoint resumes in 1 process: optimiser, scheduler, EMA and epoch carried on
    lines: list[str] = []
    resumed = train(recipe, data, out, epochs=2, resume=True, progress=False, log=lines.append)
    assert resumed.resumed_from == 1 and resumed.epoch == 2 and any("resumed from" in line for line in lines)
    assert "processes" not in resumed.history[1] and resumed.history[1]["step"] > two["step"]
    after = torch.load(out / "ensemble_frontal_pcam.pt", map_location="cpu", weights_only=True)
    assert after["ema"]["updates"] == after["global_step"] == resumed.history[1]["step"]
    assert after["scheduler"]["last_epoch"] == after["global_step"]
    assert np.isfinite(resumed.final["val_mAP"])


@pytest.mark.slow
def test_two_nodes_simulated_by_two_torchrun_launches(data, tmp_path):
    """--nnodes 2 with one process each, meeting at a c10d rendezvous on 127.0.0.1."""
    port, out = free_port(), tmp_path / "nodes"
    args = [*RECIPE, "--data", data, "--out", out, "--epochs", 1]
    logs = finish([torchrun(loopback(2, 1, port), args), torchrun(loopback(2, 1, port), args)])
    assert sum(log.count("frontal_pcam epoch 1/1") for log in logs) == 1
    state = torch.load(out / "ensemble_frontal_pcam.pt", map_location="cpu", weights_only=True)
    assert state["history"][0]["processes"] == 2


def test_nproc_runs_the_same_command_under_torchrun():
    from cxrlt.cli.commands.train import torchrun_command

    command = torchrun_command(["--config", "router", "--nproc", "2", "--nproc=2", "--epochs", "1"], 2)
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "cxrlt", "train", "--config", "router", "--epochs", "1"]
