"""Supervised fine-tuning with TRL's SFTTrainer: data -> model -> LoRA/full -> train -> save.

`main(config)` is the whole run, top to bottom; `chartvlm train` and the seed's `main.py` call it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from chartvlm.config import RunConfig
from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)


def check_config(config: RunConfig) -> None:
    """Cross-field checks that need no model: fail before anything heavy is loaded."""
    import torch

    if config.model.tuning == "qlora" and not torch.cuda.is_available():
        raise ChartVLMError("tuning=qlora needs a CUDA GPU (bitsandbytes 4-bit); use tuning=lora or full here")
    if config.train.per_device_train_batch_size < 1:
        raise ChartVLMError("per_device_train_batch_size must be >= 1")
    if config.train.remove_unused_columns:
        raise ChartVLMError("remove_unused_columns must be false: the collator builds batches from the raw rows")


def resolve_optimizer(train_args) -> None:
    """paged_adamw_* needs bitsandbytes on CUDA; elsewhere use plain AdamW and say so once."""
    import torch
    from transformers.training_args import OptimizerNames

    name = str(getattr(train_args.optim, "value", train_args.optim))
    if not name.startswith("paged_"):
        return
    try:
        import bitsandbytes  # noqa: F401

        usable = torch.cuda.is_available()
    except ImportError:
        usable = False
    if not usable:
        logger.info("optim=%s needs bitsandbytes and CUDA; using adamw_torch instead", name)
        train_args.optim = OptimizerNames.ADAMW_TORCH


def ensure_sources_reachable(config: RunConfig) -> None:
    """Hub ids are checked in seconds, so an offline machine fails fast with a pointer to the quick start."""
    from chartvlm.data import ensure_hub_reachable, is_local_source

    if not Path(config.model.model_name_or_path).exists():
        ensure_hub_reachable(config.model.model_name_or_path, repo_type="model")
    if not is_local_source(config.data.dataset):
        ensure_hub_reachable(config.data.dataset, repo_type="dataset")


def load_split(config: RunConfig, split: str):
    from chartvlm.data import load_chartqa

    return load_chartqa(config.data.dataset, split=split, subset=config.data.subset, seed=config.data.subset_seed)


def sequence_lengths(dataset, processor, system_message: str) -> list[int]:
    """Exact token count of each training sequence, from image headers (no pixel decoding)."""
    from datasets import Image as ImageFeature

    from chartvlm.images import image_size
    from chartvlm.prompts import build_messages

    merge = processor.image_processor.merge_size
    patch = processor.image_processor.patch_size
    size = processor.image_processor.size
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    raw = dataset.cast_column("image", ImageFeature(decode=False))
    lengths = []
    for row in raw:
        width, height = image_size(row["image"])
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=size["shortest_edge"],
                            max_pixels=size["longest_edge"])
        image_tokens = (h // patch) * (w // patch) // (merge * merge)
        label = row["label"][0] if row["label"] else ""
        text = processor.apply_chat_template(build_messages(None, row["query"], label, system_message), tokenize=False)
        # The template holds one <|image_pad|>; the processor expands it to image_tokens.
        lengths.append(len(processor.tokenizer(text)["input_ids"]) - 1 + image_tokens)
    return lengths


def drop_overlong(dataset, processor, max_length: int | None, system_message: str, name: str):
    """Samples longer than max_length are dropped, with a count: truncating image tokens breaks the model."""
    lengths = sequence_lengths(dataset, processor, system_message)
    if max_length is None:
        return dataset, lengths
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    dropped = len(lengths) - len(keep)
    if dropped:
        logger.warning("%s: dropped %d of %d samples longer than max_length=%d tokens (longest %d); "
                       "lower max_pixels or raise max_length to keep them", name, dropped, len(lengths),
                       max_length, max(lengths))
    if not keep:
        raise ChartVLMError(f"{name}: every sample is longer than max_length={max_length}")
    return dataset.select(keep), [lengths[i] for i in keep]


def log_sample_generation(model, processor, dataset, config: RunConfig, when: str) -> None:
    """The seed's sanity check: one generated answer next to its label."""
    from chartvlm.generate import text_generator
    from chartvlm.prompts import format_data

    sample = format_data(dataset[0], config.data.system_message)
    answer, truth = text_generator(sample, processor, model, next(model.parameters()).device,
                                   config.eval.max_new_tokens)
    logger.info("sample %s training: Q=%r -> %r (label %r)", when, dataset[0]["query"], answer, truth)


def save_outputs(trainer, model, processor, config: RunConfig) -> Path:
    """Adapter (or full model), processor, resolved config, trainer state and the loss curve."""
    from chartvlm.report import plot_loss_curve

    out = Path(config.train.output_dir)
    trainer.save_model(str(out))
    processor.save_pretrained(str(out))
    trainer.save_state()
    config.save(out)
    plot_loss_curve(trainer.state.log_history, out / "loss_curve.png")
    return out


def main(config: RunConfig | None = None) -> Path:
    """The seed's `main()`: train according to `config` (the seed recipe when None)."""
    import torch
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    from chartvlm.collate import make_collator
    from chartvlm.modeling import load_model, load_processor, prepare_for_training

    if config is None:
        from chartvlm.config import parse_config

        config = parse_config([])
    check_config(config)
    ensure_sources_reachable(config)
    resolve_optimizer(config.train)
    set_seed(config.train.seed)
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out)

    processor = load_processor(config.model.model_name_or_path, config.model.min_pixels, config.model.max_pixels)
    train_data = load_split(config, config.data.train_split)
    eval_data = load_split(config, config.data.eval_split) if config.train.eval_strategy != "no" else None
    system = config.data.system_message
    train_data, _ = drop_overlong(train_data, processor, config.train.max_length, system, "train")
    if eval_data is not None:
        eval_data, _ = drop_overlong(eval_data, processor, config.train.max_length, system, "eval")
    logger.info("training on %d samples, eval loss on %d", len(train_data), len(eval_data or []))

    model = load_model(config.model.model_name_or_path, attn_implementation=config.model.attn_implementation,
                       quantize_4bit=config.model.tuning == "qlora",
                       dtype=torch.bfloat16 if config.train.bf16 else torch.float32)
    log_sample_generation(model, processor, train_data, config, "before")
    model = prepare_for_training(model, config.model)

    trainer = SFTTrainer(
        model=model,
        args=config.train,
        data_collator=make_collator(processor, system),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=processor,
    )
    resume_from = None
    if config.train.resume:
        resume_from = get_last_checkpoint(str(out))
        if resume_from is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
        else:
            logger.info("resuming from %s", resume_from)
    trainer.train(resume_from_checkpoint=resume_from)
    if eval_data is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if "eval_loss" in metrics and not math.isfinite(metrics["eval_loss"]):
            logger.warning("eval loss is not finite: %s", metrics["eval_loss"])
    saved = save_outputs(trainer, model, processor, config)
    logger.info("saved %s to %s", "adapter" if config.model.tuning != "full" else "model", saved)
    return saved
