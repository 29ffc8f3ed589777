"""More than one process: who am I (rank/world from the launcher), the process group, sharded evaluation.

`torchrun` and `accelerate launch` start one process per GPU (or per CPU slot) and describe it in the
environment (RANK, WORLD_SIZE, LOCAL_RANK). Training needs nothing more: the Trainer (accelerate)
wraps the model in DDP/FSDP/DeepSpeed and its sampler gives each rank a disjoint part of one shuffled
order (the same seed on every rank). Evaluation is sharded here: rank r answers the questions whose
index % world == r into its own resumable folder, rank 0 gathers every shard (through the process
group, so no shared disk is needed), writes predictions.jsonl in index order and metrics.json exactly
as a single process would, and every rank returns those metrics.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

SHARDS_DIRNAME = "shards"


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


def shard_dir(out_dir: str | Path, shard_rank: int, world: int) -> Path:
    return Path(out_dir) / SHARDS_DIRNAME / f"rank{shard_rank}-of-{world}"


def merge_shards(shards: list[list[dict]], total: int, where: str | Path) -> list[dict]:
    """The rows of every shard in index order, each question once; an incomplete merge is an error."""
    by_index: dict[int, dict] = {}
    for rows in shards:
        for row in rows:
            by_index.setdefault(row["index"], row)
    missing = sorted(set(range(total)) - set(by_index))
    extra = sorted(set(by_index) - set(range(total)))
    if missing or extra:
        problem = f"{len(missing)} of {total} questions missing" if missing else f"indices {extra[:5]} beyond {total}"
        raise ChartVLMError(f"{where}: merging the evaluation shards: {problem}; re-run the same command to "
                            "resume, or delete the folder to start over")
    return [by_index[i] for i in range(total)]


def _seed_shard(merged: Path, shard: Path, shard_rank: int, world: int) -> None:
    """Copy this shard's rows from an earlier merged (or single-process) predictions.jsonl, so a resumed
    run does not redo them. On a disk other ranks cannot see, the rank simply finds nothing to copy."""
    from chartvlm.io import atomic_write_text, read_jsonl

    have = read_jsonl(shard)
    known = {row["index"] for row in have}
    earlier = [row for row in read_jsonl(merged) if row["index"] % world == shard_rank and row["index"] not in known]
    if earlier:
        rows = have + earlier
        atomic_write_text(shard, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        logger.info("rank %d: %d questions already answered in %s", shard_rank, len(earlier), merged)


def sharded_predictions(model, processor, dataset, out_dir: str | Path, settings, resume: bool = True,
                        progress: bool = True) -> dict:
    """`evaluate.run_predictions` over all ranks; in a single process it is exactly that function.

    Every rank returns the merged metrics, equal to a single-process run's except for throughput
    (questions answered by all ranks / the slowest rank's seconds)."""
    from chartvlm.evaluate import (_check_or_write_fingerprint, generation_record, prompt_template, run_predictions,
                                   write_metrics)

    world, me = world_size(), rank()
    if world == 1:
        return run_predictions(model, processor, dataset, out_dir, settings, resume=resume, progress=progress)
    import torch.distributed as dist

    from chartvlm.io import atomic_write_text, read_jsonl

    init_process_group()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every rank checks, so a changed run fails everywhere (not only on rank 0 while the others wait).
    _check_or_write_fingerprint(out, settings, resume)
    mine = shard_dir(out, me, world)
    mine.mkdir(parents=True, exist_ok=True)
    _seed_shard(out / "predictions.jsonl", mine / "predictions.jsonl", me, world)
    throughput = {"questions": 0, "seconds": 0.0}
    if me < len(dataset):  # a shard with no question has nothing to run or summarise
        shard_metrics = run_predictions(model, processor, dataset, mine, settings, resume=resume,
                                        progress=progress and me == 0, shard=(me, world))
        throughput = shard_metrics["throughput"]
    gathered = [None] * world if me == 0 else None
    dist.gather_object((read_jsonl(mine / "predictions.jsonl"), throughput), gathered, dst=0)
    result: list = [None]
    if me == 0:
        try:
            rows = merge_shards([shard_rows for shard_rows, _ in gathered], len(dataset), out)
            atomic_write_text(out / "predictions.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            timed = [t for _, t in gathered]
            result[0] = write_metrics(out, settings, questions_timed=sum(t["questions"] for t in timed),
                                      seconds=max(t["seconds"] for t in timed),
                                      prompt=prompt_template(processor, settings),
                                      generation=generation_record(processor, settings))
        except ChartVLMError as exc:  # every rank reports it, instead of waiting for a result
            result[0] = str(exc)
    dist.broadcast_object_list(result, src=0)
    if isinstance(result[0], str):
        raise ChartVLMError(result[0])
    # The merged file now holds this shard's rows (and seeds a resume): drop the shard.
    shutil.rmtree(mine, ignore_errors=True)
    try:
        mine.parent.rmdir()
    except OSError:  # another rank's shard is still there, or it is already gone
        pass
    return result[0]
