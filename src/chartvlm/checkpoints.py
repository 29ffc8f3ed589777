"""Checkpoints: written so they exist only when complete, readable by every user, and loaded strictly.

- `AtomicSaves` (a Trainer mixin; `AtomicSFTTrainer`, grpo.ChartGRPOTrainer): checkpoint-N is written under
  tmp-checkpoint-N/ and renamed into place when complete, so a process killed mid-save never leaves a broken
  latest checkpoint; the final model is written under tmp-model/ (with everything chartvlm adds to it) and
  moved into the output folder file by file. A save that fails (a full disk) removes what it staged and says
  which path and why; the previous checkpoint stays as it was.
- Resuming loads every tensor or fails: the Trainer loads a full model's checkpoint non-strictly and under
  transformers 5 the saved names (`visual.*`) differ from the in-memory ones (`model.visual.*`), so nothing
  would be restored but the optimizer and the step. A full checkpoint is loaded here through
  `from_pretrained` (which renames) and copied in strictly; an adapter must hold exactly the tensors the
  model's adapter state has.
- `last_complete_checkpoint`: what `--resume` continues from. The Trainer restores optimizer, scheduler and
  RNG states and skips the batches already seen, so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from chartvlm.errors import ChartVLMError
from chartvlm.io import make_readable, write_failure

logger = logging.getLogger(__name__)

STAGING_PREFIX = "tmp-"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


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


class AtomicSaves:
    """A Trainer mixin: saves are atomic and resume is strict (see the module's docstring).

    `final_extras(folder)`, when set, writes what chartvlm adds to the final model folder (its run
    configuration, the loss curve, ...) into the staging folder, so they appear together with the weights."""

    _staging: Path | None = None
    final_extras: Callable[[Path], None] | None = None

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
        try:
            super().save_model(str(staging), _internal_call=True)  # no push yet: the files are not in place
            if self.args.should_save:
                if self.final_extras is not None:
                    self.final_extras(staging)
                make_readable(staging)
        except Exception as error:
            failure = self._discard_failed_save(error, staging)
            raise ChartVLMError(f"saving the trained model to {out} failed: {failure}; nothing in {out} was "
                                "replaced") from None
        if self.args.should_save:
            move_into(staging, out)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _discard_failed_save(self, error: Exception, staging: Path) -> str:
        """After a save failed: what went wrong (a full disk, a permission) with the staged files removed; an
        error that is neither is raised again as it was."""
        failure = write_failure(error, staging)  # before the cleanup frees the space
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is None:
            raise error
        return failure

    def save_state(self) -> None:
        if self.is_world_process_zero():
            path = Path(self.args.output_dir) / TRAINER_STATE_NAME
            partial = path.with_name(f".{path.name}.tmp")
            self.state.save_to_json(str(partial))
            os.chmod(partial, 0o644)
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
        except Exception as error:
            failure = self._discard_failed_save(error, staging)
            previous = last_complete_checkpoint(run_dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise ChartVLMError(f"writing checkpoint {final} failed: {failure}; {kept}") from None
        finally:
            self._staging = None
        best_is_this_one = self.state.best_model_checkpoint == str(staging / name)
        if best_is_this_one:
            self.state.best_model_checkpoint = str(final)
        self.accelerator.wait_for_everyone()  # every process's files (rng_state_<i>.pth) are in
        if self.args.should_save:
            if best_is_this_one:  # the saved state recorded the staging path
                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
            make_readable(staging)
            publish_checkpoint(staging / name, final)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        folder = Path(resume_from_checkpoint)
        if hasattr(model, "peft_config"):
            check_adapter_checkpoint(model, folder)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_full_checkpoint(model, folder)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or best is None:
            return super()._load_best_model()
        if hasattr(self.model, "peft_config"):
            check_adapter_checkpoint(self.model, Path(best))
            return super()._load_best_model()
        logger.info("loading the best model from %s (score: %s)", best, self.state.best_metric)
        load_full_checkpoint(self.model, Path(best))


class AtomicSFTTrainer(AtomicSaves, SFTTrainer):
    """SFTTrainer with chartvlm's saves and resume."""


def load_full_checkpoint(model, folder: Path) -> None:
    """Load a full-model checkpoint into `model`: through `from_pretrained` (the checkpoint's names are the
    saved ones, which transformers renames on load), then copied in strictly, so every tensor is restored
    or the resume fails naming what is missing."""
    import torch

    dtype = next(model.parameters()).dtype
    try:
        loaded, info = type(model).from_pretrained(folder, dtype=dtype, device_map={"": "cpu"},
                                                   output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ChartVLMError(f"{folder}: cannot read the checkpoint ({error})") from None
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: sorted(str(key) for key in keys) for kind, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {', '.join(keys[:3])})"
                           for kind, keys in problems.items())
        raise ChartVLMError(f"{folder}: the checkpoint does not match the model being trained: {detail}. "
                            "Resume with the same model and tuning options, or start a new output_dir")
    with torch.no_grad():
        model.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    logger.info("restored every weight of the model from %s", folder)


def check_adapter_checkpoint(model, folder: Path) -> None:
    """The adapter in `folder` must hold exactly the tensors `model`'s adapter state has (LoRA weights and
    every module saved whole, such as a trained vision tower); the Trainer would load any subset silently."""
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise ChartVLMError(f"{folder}: no {ADAPTER_WEIGHTS}; cannot resume a LoRA run from it")
    with safe_open(str(path), framework="pt") as handle:
        found = set(handle.keys())
    expected = set(get_peft_model_state_dict(model))
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        detail = "; ".join(f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})"
                           for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise ChartVLMError(f"{path}: the adapter does not match the model being trained: {detail}. Resume with "
                            "the same model and tuning options, or start a new output_dir")


def check_trainable_parameters_are_saved(model) -> None:
    """Every parameter that trains must be in what a save writes: PEFT saves adapter tensors only, so a module
    made trainable by hand (not LoRA, not in modules_to_save) would train and be lost."""
    if not hasattr(model, "peft_config"):
        return
    from peft.utils import get_peft_model_state_dict

    saved = {tensor.data_ptr() for tensor in get_peft_model_state_dict(model).values()}
    lost = [name for name, param in model.named_parameters() if param.requires_grad and param.data_ptr() not in saved]
    if lost:
        raise ChartVLMError(f"{len(lost)} trainable parameters would not be saved with the adapter "
                            f"(e.g. {', '.join(lost[:3])})")


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
