"""More than one process: who am I (rank/world from the launcher) and the process group.

`torchrun` and `accelerate launch` start one process per GPU (or per CPU slot) and describe it in the
environment (RANK, WORLD_SIZE, LOCAL_RANK). Training needs nothing more: the Trainer (accelerate)
wraps the model in DDP/FSDP/DeepSpeed and its sampler gives each rank a disjoint part of one shuffled
order (the same seed on every rank). Evaluation shards its questions by rank (evaluate.sharded_predictions).
"""

from __future__ import annotations

import logging
import os

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Global rank 0: the one process that writes files outside the Trainer and prints results."""
    return rank() == 0


def configure_cpu_launch() -> None:
    """Without CUDA, accelerate treats a multi-process launch as distributed (DDP over gloo) only when it
    is told to use the CPU; otherwise every rank silently trains alone on all the data. Call before the
    TrainingArguments are built (they set up the devices when created)."""
    import torch

    if world_size() > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def init_process_group() -> bool:
    """Join the launcher's process group (nccl with one GPU per LOCAL_RANK, gloo on CPU).

    Returns False in a single process. Safe to call when accelerate already initialised the group."""
    if world_size() == 1:
        return False
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def check_final_save(trainer) -> None:
    """Under FSDP the Trainer writes the final adapter/model only with a full state dict: with a sharded
    one, output_dir would get no weights at all, which is found out only after training."""
    if getattr(trainer, "is_fsdp_enabled", False):
        kind = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in kind:
            raise ChartVLMError(f"FSDP state_dict_type is {kind}: the final save would write no weights to "
                                "output_dir; set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config "
                                "(as configs/accelerate/fsdp.yaml does)")
