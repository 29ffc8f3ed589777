"""Interruptions: SIGTERM saves a checkpoint and stops cleanly; a save killed midway leaves the last complete
checkpoint; either way, `--resume` ends with the adapter weights of an uninterrupted run."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chartvlm.config import parse_config
from chartvlm.checkpoints import discard_unfinished_saves, last_complete_checkpoint
from chartvlm.interrupt import InterruptCallback
from chartvlm.train import main as train_main
from conftest import run_args

# 10 training rows in batches of 2 make 5 steps per epoch: both resumes below cross into the second epoch.
STEPS = 7

# A real `chartvlm train` process that is signalled (SIGTERM at the end of a step) or killed (SIGKILL halfway
# through writing a checkpoint's optimizer state) at a chosen step.
KILLER = """
import os, signal, sys
from pathlib import Path

import transformers
from chartvlm import cli, interrupt

mode, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if mode == "sigterm":
    on_step_end = interrupt.InterruptCallback.on_step_end

    def signal_at_step(self, args, state, control, **kwargs):
        if state.global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return on_step_end(self, args, state, control, **kwargs)

    interrupt.InterruptCallback.on_step_end = signal_at_step
else:
    save = transformers.Trainer._save_optimizer_and_scheduler

    def killed_while_saving(self, output_dir):
        if self.state.global_step == step:
            Path(output_dir, "optimizer.pt").write_bytes(b"half an optimizer")
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, output_dir)

    transformers.Trainer._save_optimizer_and_scheduler = killed_while_saving
sys.exit(cli.main(["train", *argv]))
"""


def train_args(model_dir, data_dir, out, *extra):
    return run_args(model_dir, data_dir, out, "--max_steps", str(STEPS), *extra)


def run_killed(mode: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, mode, str(step), *args], capture_output=True, text=True,
                          timeout=300)


def adapter_weights(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def checkpoints(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_model_dir, chart_dataset_dir, tmp_path_factory):
    """The run without interruption (and without checkpoints: saving changes nothing): (folder, adapter)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    weights = adapter_weights(train_main(parse_config(train_args(tiny_model_dir, chart_dataset_dir, out))))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k), "the run must train something"
    return out, weights


@pytest.fixture
def uninterrupted(uninterrupted_run):
    return uninterrupted_run[1]


def test_sigterm_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(
        uninterrupted, tiny_model_dir, chart_dataset_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, chart_dataset_dir, out, "--save_strategy", "steps", "--save_steps", "5")
    result = run_killed("sigterm", 3, args)

    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert (f"chartvlm train: interrupted by SIGTERM at step 3; checkpoint saved in {out / 'checkpoint-3'}; "
            "resume with --resume true") in result.stderr
    assert "Traceback" not in result.stderr
    # save_steps=5 would not have saved step 3: the signal did. No final model pretends the run finished.
    assert checkpoints(out) == ["checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "adapter_model.safetensors").exists() and not (out / "trainer_state.json").exists()

    train_main(parse_config([*args, "--resume", "true"]))
    state = json.loads((out / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, STEPS + 1))
    assert_same_weights(adapter_weights(out), uninterrupted)


def test_a_kill_during_a_checkpoint_save_resumes_from_the_last_complete_one(
        uninterrupted, tiny_model_dir, chart_dataset_dir, tmp_path, caplog):
    out = tmp_path / "run"
    args = train_args(tiny_model_dir, chart_dataset_dir, out, "--save_strategy", "steps", "--save_steps", "1")
    result = run_killed("sigkill", 6, args)

    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    # The save of step 6 died after the adapter, halfway through the optimizer: it never became checkpoint-6.
    assert checkpoints(out) == [f"checkpoint-{step}" for step in range(1, 6)]
    partial = out / "tmp-checkpoint-6" / "checkpoint-6"
    assert (partial / "adapter_model.safetensors").is_file()
    assert (partial / "optimizer.pt").read_bytes() == b"half an optimizer"

    with caplog.at_level(logging.INFO, logger="chartvlm"):
        train_main(parse_config([*args, "--resume", "true"]))
    assert f"resuming from {out / 'checkpoint-5'}" in caplog.text
    assert not (out / "tmp-checkpoint-6").exists()
    assert checkpoints(out) == [f"checkpoint-{step}" for step in range(1, STEPS + 1)]
    assert_same_weights(adapter_weights(out), uninterrupted)


def test_a_crash_while_saving_the_final_adapter_leaves_the_previous_one_whole(
        uninterrupted_run, tiny_model_dir, chart_dataset_dir, tmp_path, monkeypatch):
    import transformers

    finished, weights = uninterrupted_run
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    save = transformers.Trainer._save

    def crash_halfway(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        written = Path(output_dir) / "adapter_model.safetensors"
        written.write_bytes(written.read_bytes()[: written.stat().st_size // 2])
        raise RuntimeError("died while saving")

    monkeypatch.setattr(transformers.Trainer, "_save", crash_halfway)
    with pytest.raises(RuntimeError, match="died while saving"):
        train_main(parse_config(run_args(tiny_model_dir, chart_dataset_dir, out, "--max_steps", "1")))
    # The adapter in the output folder is the previous run's, whole; the torn staging copy was removed.
    assert_same_weights(adapter_weights(out), weights)
    assert not (out / "tmp-model").exists()


def test_last_complete_checkpoint_skips_unfinished_saves(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-11", False),
                           ("tmp-checkpoint-12/checkpoint-12", True), ("checkpoint-x", True), ("tmp-model", False)):
        (tmp_path / name).mkdir(parents=True)
        if complete:
            (tmp_path / name / "trainer_state.json").write_text("{}")
    # Numeric order (10 > 2); checkpoint-11 lacks the state a save writes last; tmp- is a save in progress.
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert discard_unfinished_saves(tmp_path) == [tmp_path / "tmp-checkpoint-12", tmp_path / "tmp-model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11", "checkpoint-2",
                                                          "checkpoint-x"]


def test_first_signal_asks_for_a_checkpoint_second_stops_at_once():
    from transformers import TrainerControl, TrainerState

    before = signal.getsignal(signal.SIGINT)
    callback = InterruptCallback()
    state, control = TrainerState(global_step=4), TrainerControl()
    callback.on_train_begin(None, state, control)
    try:
        callback.on_step_end(None, state, control)
        assert not (control.should_save or control.should_training_stop)
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.signum == signal.SIGINT
        callback.on_step_end(None, state, control)
        assert control.should_save and control.should_training_stop and not control.should_evaluate
        callback.on_save(None, state, control)
        control.should_save = False
        callback.on_epoch_end(None, state, control)
        assert not control.should_save, "step 4 is saved already"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        callback.restore()
    assert signal.getsignal(signal.SIGINT) is before
