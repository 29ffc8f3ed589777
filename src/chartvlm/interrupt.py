"""Interruptions: stop on SIGINT/SIGTERM with a checkpoint; checkpoints that exist only when complete.

- `InterruptCallback`: the first SIGINT/SIGTERM during training asks for a checkpoint at the end of the
  current step and a clean stop; a second one stops at once (the previous handler runs).
- `AtomicSFTTrainer`: checkpoint-N is written under tmp-checkpoint-N/ and renamed into place when complete,
  so a process killed mid-save never leaves a broken latest checkpoint; the final model is written under
  tmp-model/ and moved into the output folder file by file.
- `last_complete_checkpoint`: what `--resume` continues from. The Trainer restores weights, optimizer,
  scheduler and RNG states and skips the batches already seen, so a resumed run ends where an
  uninterrupted one does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STAGING_PREFIX = "tmp-"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


class TrainingInterrupted(ChartVLMError):
    """Training stopped on a signal after saving a checkpoint. `exit_code` is a shell's 128 + signal number."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        saved = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; {saved}; "
                         "resume with --resume true")


class InterruptCallback(TrainerCallback):
    """Turns SIGINT/SIGTERM during `trainer.train()` into: finish this step, save a checkpoint, stop."""

    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self.saved_step: int | None = None
        self._previous: dict[int, object] = {}
        self._pid: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGINT/SIGTERM will not save a checkpoint")
            return
        self._pid = os.getpid()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put the previous handlers back (safe to call more than once)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked dataloader worker: the main process decides
            return
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            logger.warning("%s: saving a checkpoint after the current step, then stopping "
                           "(send %s again to stop at once, without saving)", name, name)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        logger.warning("second %s: stopping now", name)
        if callable(previous):  # SIGINT's default_int_handler raises KeyboardInterrupt
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)

    def _agree(self, args) -> None:
        """Under torchrun every process must stop (and save) at the same step, whichever got the signal."""
        if getattr(args, "world_size", 1) <= 1:
            return
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            signum = torch.tensor(self.signum or 0, device=args.device)
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
            self.signum = self.signum or int(signum.item()) or None

    def _stop_if_interrupted(self, args, state, control):
        self._agree(args)
        if self.signum is not None:
            control.should_save = self.saved_step != state.global_step
            control.should_evaluate = False
            control.should_training_stop = True
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        return self._stop_if_interrupted(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._stop_if_interrupted(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files and the folder itself, so a rename publishes data that is on disk."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicSFTTrainer(SFTTrainer):
    """SFTTrainer whose checkpoint-N folders appear only when complete (written under tmp-checkpoint-N/)."""

    _staging: Path | None = None

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being saved, the Trainer writes into the staging folder.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging is None:  # while staging, the push waits for the final folder
            super()._push_from_checkpoint(checkpoint_folder)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The final model is written under tmp-model/ and then moved into output_dir file by file, so each
        file there is whole. Checkpoints (`_internal_call`) are staged by _save_checkpoint; FSDP and
        DeepSpeed, where every process writes, save in place."""
        if _internal_call or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        out = Path(output_dir or self.args.output_dir)
        staging = out / f"{STAGING_PREFIX}model"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        super().save_model(str(staging), _internal_call=True)  # no push yet: the files are not in place
        if self.args.should_save:
            move_into(staging, out)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def save_state(self) -> None:
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / TRAINER_STATE_NAME
            partial = path.with_name(f".{path.name}.tmp")
            self.state.save_to_json(str(partial))
            os.replace(partial, path)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = run_dir / f"{STAGING_PREFIX}{name}", run_dir / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        best_is_this_one = self.state.best_model_checkpoint == str(staging / name)
        if best_is_this_one:
            self.state.best_model_checkpoint = str(final)
        self.accelerator.wait_for_everyone()  # every process's files (rng_state_<i>.pth) are in
        if self.args.should_save:
            if best_is_this_one:  # the saved state recorded the staging path
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
            publish_checkpoint(staging / name, final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))
        self.accelerator.wait_for_everyone()


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Rename a completely written checkpoint into place (replacing an older save of the same step)."""
    _fsync_tree(staged)
    if final.exists():  # the same step saved twice; a kill in between leaves the previous checkpoint
        os.replace(final, staged.parent / "replaced")
    os.replace(staged, final)
    _fsync_dir(final.parent)
    shutil.rmtree(staged.parent)
    logger.info("checkpoint %s complete", final)


def move_into(staging: Path, out: Path) -> None:
    """Move the entries of a completely written folder into `out` (replacing older ones), then drop it."""
    _fsync_tree(staging)
    for entry in sorted(staging.iterdir()):
        target = out / entry.name
        if entry.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    _fsync_dir(out)
    staging.rmdir()


def discard_unfinished_saves(folder: str | Path) -> list[Path]:
    """Remove the tmp-checkpoint-*/ and tmp-model/ folders of saves that were killed midway."""
    folder = Path(folder)
    stale = [] if not folder.is_dir() else sorted(
        [*folder.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"), *folder.glob(f"{STAGING_PREFIX}model")])
    for path in stale:
        logger.warning("removing %s: a save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def last_complete_checkpoint(folder: str | Path) -> str | None:
    """The newest checkpoint-N holding its trainer state (the file a save writes last), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), path) for path in folder.iterdir()
             if path.is_dir() and (m := _CHECKPOINT.fullmatch(path.name))]
    for _, path in sorted(found, reverse=True):
        if (path / TRAINER_STATE_NAME).is_file():
            return str(path)
        logger.warning("skipping %s: incomplete (no %s)", path, TRAINER_STATE_NAME)
    return None
