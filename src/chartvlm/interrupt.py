"""Interruptions: the first SIGINT/SIGTERM during training asks for a checkpoint at the end of the current
step and a clean stop; a second one stops at once (the previous handler runs). Checkpoints themselves
(written atomically, loaded strictly) are chartvlm.checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from transformers import TrainerCallback

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
