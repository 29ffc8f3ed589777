"""Fine-tuning: data -> model -> LoRA/full -> train -> save, with TRL's SFTTrainer (method sft, the default) or
its GRPOTrainer (method grpo, `chartvlm.grpo`).

`main(config)` is the whole run, top to bottom; `chartvlm train` and the seed's `main.py` call it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from chartvlm.config import RunConfig, completion_tokens
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
    if config.train.method == "grpo" and config.train.packing:
        raise ChartVLMError("packing is for method sft: GRPO generates its completions, there is nothing to pack")
    if config.train.loss_type not in config.train.loss_types():
        hint = " (a chartvlm_config.yaml that GRPO runs wrote before loss_type reached GRPO records SFT's nll: " \
               "drop the line)" if config.train.loss_type == "nll" else ""
        raise ChartVLMError(f"loss_type for method {config.train.method} must be one of "
                            f"{', '.join(config.train.loss_types())}, got {config.train.loss_type!r}{hint}")
    if config.train.method == "sft" and config.data.reasoning:
        raise ChartVLMError("reasoning: true trains with method grpo: the labels hold no reasoning for SFT to "
                            "supervise, only the answers")
    if config.train.method == "grpo":
        from chartvlm.grpo import check_grpo_config

        check_grpo_config(config)
    from chartvlm.distributed import world_size

    if world_size() > 1 and config.train.world_size != world_size():
        raise ChartVLMError(f"launched as {world_size()} processes but the Trainer sees {config.train.world_size}, so "
                            "each would train alone: without CUDA pass --use_cpu true (chartvlm train does it)")


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
    from chartvlm.hub import ensure_hub_reachable, is_local_source

    if not Path(config.model.model_name_or_path).exists():
        ensure_hub_reachable(config.model.model_name_or_path, repo_type="model")
    if not is_local_source(config.data.dataset):
        ensure_hub_reachable(config.data.dataset, repo_type="dataset")


def load_split(config: RunConfig, split: str, skipped=None):
    """One split, with bad rows handled by `skipped` (a data.SkippedRows), else by config's on_bad_sample
    (default: error)."""
    from chartvlm.data import load_chartqa

    return load_chartqa(config.data.dataset, split=split, subset=config.data.subset, seed=config.data.subset_seed,
                        on_bad_sample=skipped if skipped is not None else config.data.on_bad_sample or "error",
                        allow_outside_images=config.data.allow_outside_images)


def sequence_length(processor, system_message: str, generated_tokens: int | None = None):
    """`measure(row, width, height)` for data.validate_rows: the exact token count of a training sequence (as
    collate builds it: prompt with the image's tokens, then the completion), from the image size in its
    header (no pixel decoding). With `generated_tokens` (GRPO), the prompt and that many generated tokens."""
    from chartvlm.images import image_token_count
    from chartvlm.prompts import build_messages, prompt_and_completion

    tokenizer = processor.tokenizer
    model = getattr(tokenizer, "name_or_path", "") or "this model"

    def measure(row: dict, width: int, height: int) -> int:
        label = row["label"][0] if row["label"] else ""
        prompt, completion = prompt_and_completion(processor, build_messages(None, row["query"], label, system_message),
                                                   model)
        # The prompt holds one <|image_pad|>; the processor expands it to the image's tokens.
        text_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 1
        answer_tokens = generated_tokens if generated_tokens is not None else \
            len(tokenizer(completion, add_special_tokens=False)["input_ids"])
        return text_tokens + image_token_count(processor, width, height) + answer_tokens

    return measure


def sequence_lengths(dataset, processor, system_message: str) -> list[int]:
    """Exact token count of each training sequence, from image headers (no pixel decoding)."""
    from chartvlm.validate import SkippedRows, validate_rows

    measure = sequence_length(processor, system_message)
    return validate_rows(dataset, SkippedRows("error"), "data", measure=measure)[1]


def prepare_split(dataset, processor, config: RunConfig, skipped, split: str, drop_duplicates: bool):
    """The one pass over a split before training (data.validate_rows): bad rows per on_bad_sample, exact
    duplicates dropped from the training split, and sequence lengths from the same read of each image
    header; then samples longer than max_length are dropped (listed in skipped.jsonl too)."""
    from chartvlm.validate import validate_rows
    from chartvlm.prompts import control_tokens

    name = f"{config.data.dataset} ({split})"
    generated = completion_tokens(config) if config.train.method == "grpo" else None
    measure = sequence_length(processor, config.data.system_message, generated)
    dataset, lengths = validate_rows(dataset, skipped, name, measure=measure, drop_duplicates=drop_duplicates,
                                     control_tokens=control_tokens(processor.tokenizer))
    return drop_overlong(dataset, lengths, config.train.max_length, name, skipped)


def drop_overlong(dataset, lengths: list[int], max_length: int | None, name: str, skipped=None):
    """Samples longer than max_length are dropped, with a count: truncating image tokens breaks the model."""
    if max_length is None:
        return dataset, lengths
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    dropped = len(lengths) - len(keep)
    if dropped:
        logger.warning("%s: dropped %d of %d samples longer than max_length=%d tokens (longest %d); "
                       "lower max_pixels or raise max_length to keep them", name, dropped, len(lengths),
                       max_length, max(lengths))
        if skipped is not None:
            row_ids = dataset["row_id"] if "row_id" in dataset.column_names else list(range(len(dataset)))
            for index in sorted(set(range(len(lengths))) - set(keep)):
                skipped.record(f"{name} row {row_ids[index]}", f"{lengths[index]} tokens, longer than "
                               f"max_length={max_length}", str(row_ids[index]), kind="too_long")
    if not keep:
        raise ChartVLMError(f"{name}: every sample is longer than max_length={max_length}")
    return dataset.select(keep), [lengths[i] for i in keep]


def with_lengths(dataset, lengths: list[int], column: str = "length"):
    """The exact sequence lengths as a column, so train_sampling_strategy=group_by_length batches samples of
    similar token counts (image tokens vary per chart) without decoding an image: padding is wasted compute."""
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, lengths)


def supervised_loss(model, inputs: dict, num_items_in_batch=None, full_logits: bool = False):
    """Cross-entropy of the supervised tokens (labels != -100): summed, divided by num_items_in_batch (the
    Trainer's count over the whole accumulated batch), else by this batch's count. Returns (loss, outputs).

    By default the LM head runs only on the positions whose next token is supervised (`logits_to_keep` as a
    boolean mask): an answer is a few tokens after hundreds of image and prompt tokens, so projecting every
    position onto the vocabulary is almost all waste. TRL's fused head skips it only on Triton devices.
    full_logits=True is the seed recipe's loss: the model's own, over the logits of every position.
    Both give the same loss and gradients (tests/test_speed.py).
    """
    import torch
    import torch.nn.functional as F

    from chartvlm.collate import IGNORE_INDEX

    if full_logits:
        outputs = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch)
        return outputs.loss, outputs
    labels = inputs["labels"]
    supervised = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
    keep = F.pad(supervised, (0, 1), value=False)
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=keep)
    targets = labels[:, 1:][supervised]  # row-major, the order logits_to_keep keeps
    loss = F.cross_entropy(outputs.logits.float(), targets.to(outputs.logits.device), reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1), outputs


def skip_frozen_vision_backward(model) -> bool:
    """Detach the vision tower's output when none of its weights train. Gradient checkpointing makes the
    input embeddings' outputs require grad (enable_input_require_grads, for PEFT), and transformers counts
    the vision patch embedding among them: every step then back-propagates through the frozen tower and,
    checkpointed, recomputes it, for gradients nothing uses (`chartvlm bench train` recipe
    vision-no-backward). Returns whether the hook was added; the trainable weights' gradients do not change."""
    from chartvlm.families import family_of
    from chartvlm.modeling import vision_parameters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower = family_of(base).vision_tower
    if any(p.requires_grad for p in vision_parameters(model)):
        return False
    visual = next((m for name, m in model.named_modules() if name.split(".")[-1] == tower), None)
    if visual is None:
        return False

    def detach(module, args, output):
        for key in ("last_hidden_state", "pooler_output"):
            value = getattr(output, key, None)
            if value is not None and value.requires_grad:
                setattr(output, key, value.detach())
        return output

    visual.register_forward_hook(detach)
    return True


def with_supervised_loss(trainer_class):
    """`trainer_class` (an SFTTrainer) computing its loss with `supervised_loss`."""

    class ChartSFTTrainer(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = supervised_loss(model, inputs, num_items_in_batch, self.args.full_logits_loss)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts every rank's tokens while DDP averages the gradients (as Trainer does).
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return (loss, outputs) if return_outputs else loss

    return ChartSFTTrainer


def build_trainer(model, processor, config: RunConfig, train_data, eval_data=None, callbacks=(),
                  skip_vision_backward: bool = True):
    """The model made trainable (LoRA, QLoRA or full, `modeling.prepare_for_training`) and the SFTTrainer that
    trains it with chartvlm's collator, answer-only loss, atomic checkpoints and strict resume; with packing,
    on padding-free packed rows (`chartvlm.packing`; `train_data` must carry the length column). `chartvlm train`
    and `chartvlm bench train` both build their trainer here."""
    from chartvlm import packing
    from chartvlm.checkpoints import AtomicSFTTrainer
    from chartvlm.collate import make_collator
    from chartvlm.families import family_of
    from chartvlm.modeling import prepare_for_training

    if config.model.attn_implementation != model.config._attn_implementation:  # noqa: SLF001
        model.set_attn_implementation(config.model.attn_implementation)
    collator = make_collator(processor, config.data.system_message)
    args = config.train
    if args.packing:
        packing.prepare_model(model, family_of(model), config.model.attn_implementation)
        collator = packing.PackedCollator(collator, train_data, packing.rope_index_of(model))
        train_data = packing.packed_dataset(train_data, train_data[args.length_column_name], args.max_length,
                                            args.length_column_name)
    model = prepare_for_training(model, config.model)
    if skip_vision_backward:
        skip_frozen_vision_backward(model)
    # TRL refuses its own packing for vision data; chartvlm packs its own way, so TRL is told there is none.
    wanted, args.packing = args.packing, False
    try:
        return with_supervised_loss(AtomicSFTTrainer)(
            model=model, args=args, data_collator=collator, train_dataset=train_data, eval_dataset=eval_data,
            processing_class=processor, callbacks=list(callbacks))
    finally:
        args.packing = wanted


def log_sample_generation(model, processor, dataset, config: RunConfig, when: str) -> None:
    """The seed's sanity check: one generated answer next to its label."""
    from chartvlm.generate import text_generator
    from chartvlm.prompts import format_data

    sample = format_data(dataset[0], config.data.system_message)
    answer, truth = text_generator(sample, processor, model, next(model.parameters()).device,
                                   config.eval.max_new_tokens)
    logger.info("sample %s training: Q=%r -> %r (label %r)", when, dataset[0]["query"], answer, truth)


def save_outputs(trainer, processor, config: RunConfig, base: dict) -> Path:
    """The final adapter (or full model) with its processor, resolved config, base record and loss curve,
    staged and moved into output_dir together (checkpoints.AtomicSFTTrainer), then the trainer state."""
    from chartvlm.io import atomic_write_json
    from chartvlm.modeling import BASE_RECORD
    from chartvlm.report import REWARD_CURVES, plot_loss_curve, plot_reward_curves

    def extras(folder: Path) -> None:
        config.save(folder)
        atomic_write_json(folder / BASE_RECORD, base)
        plots = [(plot_loss_curve, "loss_curve.png")]
        if config.train.method == "grpo":
            plots.append((plot_reward_curves, REWARD_CURVES))
        for plot, name in plots:
            try:
                plot(trainer.state.log_history, folder / name)
            except OSError:  # the disk: the save fails as a whole, with its message
                raise
            except Exception as error:  # noqa: BLE001 - a picture never costs the trained model
                logger.warning("%s not drawn (%s: %s); the model is saved", name, type(error).__name__, error)

    out = Path(config.train.output_dir)
    trainer.final_extras = extras
    trainer.save_model(str(out))  # on every rank: FSDP/ZeRO-3 gather the weights; rank 0 writes
    trainer.save_state()
    return out


def main(config: RunConfig | None = None) -> Path:
    """The seed's `main()`: train according to `config` (the seed recipe when None)."""
    import torch
    from transformers import set_seed

    from chartvlm.checkpoints import discard_unfinished_saves, last_complete_checkpoint
    from chartvlm.validate import SkippedRows
    from chartvlm.distributed import check_final_save, is_main_process
    from chartvlm.errors import BadSampleError
    from chartvlm.interrupt import InterruptCallback, TrainingInterrupted
    from chartvlm.io import ensure_writable_dir
    from chartvlm.modeling import base_record, check_adapter, check_model_folder, load_model, load_processor
    from chartvlm.prompts import check_system_message, control_tokens

    if config is None:
        from chartvlm.config import parse_config

        config = parse_config([])
    check_config(config)
    check_model_folder(config.model.model_name_or_path)
    if config.model.init_adapter:  # before anything is loaded: an adapter of another base is refused
        check_adapter(config.model.init_adapter, config.model.model_name_or_path, config.eval.force_adapter)
    ensure_sources_reachable(config)
    resolve_optimizer(config.train)
    set_seed(config.train.seed)
    out = Path(config.train.output_dir)
    ensure_writable_dir(out, "output_dir")
    main_process = is_main_process()  # rank 0 of a torchrun/accelerate launch writes what the Trainer does not
    if main_process:
        config.save(out)

    processor = load_processor(config.model.model_name_or_path, config.model.min_pixels, config.model.max_pixels)
    controls = control_tokens(processor.tokenizer)
    system = config.data.system_message
    try:
        check_system_message(system, "system_message", controls)
    except BadSampleError as error:
        raise ChartVLMError(str(error)) from None
    skipped = SkippedRows(config.data.on_bad_sample or "skip")
    try:
        train_data = load_split(config, config.data.train_split, skipped)
        eval_data = load_split(config, config.data.eval_split, skipped) if config.train.eval_strategy != "no" else None
        # Training drops exact duplicates (they would only reweight those questions); the eval-loss split keeps them.
        train_data, lengths = prepare_split(train_data, processor, config, skipped, config.data.train_split, True)
        train_data = with_lengths(train_data, lengths, config.train.length_column_name)
        if eval_data is not None:
            eval_data, lengths = prepare_split(eval_data, processor, config, skipped, config.data.eval_split, False)
            eval_data = with_lengths(eval_data, lengths, config.train.length_column_name)
    finally:  # also when every row was bad: the message points to this file
        if main_process:
            skipped.write(out)
    logger.info("training on %d samples, eval loss on %d", len(train_data), len(eval_data or []))

    model = load_model(config.model.model_name_or_path, attn_implementation=config.model.attn_implementation,
                       quantize_4bit=config.model.tuning == "qlora",
                       dtype=torch.bfloat16 if config.train.bf16 else torch.float32)
    base = base_record(config.model.model_name_or_path, model.config.model_type) if main_process else {}
    if main_process:
        log_sample_generation(model, processor, train_data, config, "before")
    interrupt = InterruptCallback()
    if config.train.method == "grpo":
        from chartvlm.grpo import build_grpo_trainer

        trainer = build_grpo_trainer(model, processor, config, train_data, eval_data, callbacks=[interrupt])
    else:
        trainer = build_trainer(model, processor, config, train_data, eval_data, callbacks=[interrupt])
    check_final_save(trainer)
    resume_from = None
    if config.train.resume:
        if main_process:
            discard_unfinished_saves(out)
        resume_from = last_complete_checkpoint(out)
        if resume_from is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
        else:
            logger.info("resuming from %s", resume_from)
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:
        interrupt.restore()
    if interrupt.signum is not None:  # a checkpoint was saved; the final eval and outputs wait for --resume
        checkpoint = out / f"checkpoint-{interrupt.saved_step}" if interrupt.saved_step is not None else None
        raise TrainingInterrupted(interrupt.signum, trainer.state.global_step, checkpoint and str(checkpoint))
    if eval_data is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if "eval_loss" in metrics and not math.isfinite(metrics["eval_loss"]):
            logger.warning("eval loss is not finite: %s", metrics["eval_loss"])
    saved = save_outputs(trainer, processor, config, base)
    logger.info("saved %s to %s", "adapter" if config.model.tuning != "full" else "model", saved)
    return saved
