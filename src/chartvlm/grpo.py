"""Reinforcement fine-tuning with TRL's GRPOTrainer, the ChartQA metric as the reward (`chartvlm.rewards`).

For each question the policy samples `num_generations` completions; each is scored by the configured rewards
(weighted sum) and pushed towards the better ones of its group, with a KL term (beta) against the model it
started from. What chartvlm adds to TRL's trainer:
- the prompts are the ones SFT and evaluation build (`prompts.build_messages`, the same system prompt, chat
  template variables and `images.model_image` pixels), so a GRPO model is evaluated as it was trained;
- every completion ends at `<|im_end|>`, the token chartvlm's answers end with, whatever the checkpoint's eos;
- saves and resume are chartvlm's (atomic checkpoints, strict resume, `checkpoints.AtomicSaves`), and only the
  trained adapter is saved (not the frozen reference copy TRL keeps when it continues an adapter);
- at each log, a few completions with their rewards go to the console and to TensorBoard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math

from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer, SFTConfig

from chartvlm.checkpoints import AtomicSaves
from chartvlm.config import RunConfig, completion_tokens
from chartvlm.errors import ChartVLMError
from chartvlm.rewards import completion_text

logger = logging.getLogger(__name__)

# Completions shown at each log (console and TensorBoard), and how much of each.
SAMPLES_PER_LOG = 4
SAMPLE_CHARS = 300


def prompt_rows(dataset, processor, system_message: str):
    """`dataset` (ChartQA rows) as GRPO reads it, built when a row is read: `prompt` (the system and user messages
    with an image placeholder), `image` (the chart as every stage prepares it), `label`, `query`, `row_id`."""
    from chartvlm.collate import example_name
    from chartvlm.images import model_image
    from chartvlm.prompts import build_messages

    def to_prompts(batch: dict) -> dict:
        count = len(batch["query"])
        rows = [{key: values[i] for key, values in batch.items()} for i in range(count)]
        out = {"prompt": [], "image": [], "label": [], "query": [], "row_id": []}
        for i, row in enumerate(rows):
            messages = build_messages(None, row["query"], system_message=system_message)
            for message in messages:  # TRL puts the image into the placeholder that has none
                message["content"] = [{"type": "image"} if part["type"] == "image" else part
                                      for part in message["content"]]
            out["prompt"].append(messages)
            out["image"].append(model_image(row["image"], processor, example_name(row, i)))
            out["label"].append([str(label) for label in row["label"]])
            out["query"].append(row["query"])
            out["row_id"].append(str(row.get("row_id") or i))
        return out

    return dataset.with_transform(to_prompts)


def generation_batch(config: RunConfig, world: int) -> dict:
    """TRL's generation_batch_size / steps_per_generation: as given, else the smallest batch of whole groups
    (num_generations completions of one prompt) that is a multiple of the optimizer's batch."""
    grpo, train = config.grpo, config.train
    if grpo.generation_batch_size is not None or grpo.steps_per_generation is not None:
        return {"generation_batch_size": grpo.generation_batch_size, "steps_per_generation": grpo.steps_per_generation}
    step = train.per_device_train_batch_size * world * train.gradient_accumulation_steps
    return {"generation_batch_size": math.lcm(step, grpo.num_generations or 1)}


def grpo_arguments(config: RunConfig, processor, reward_weights: list[float]) -> GRPOConfig:
    """The GRPOConfig of a run: the Trainer options of config.train, the GRPO options of config.grpo, and what
    chartvlm sets (the reward weights, the chat template's variables, the completion length)."""
    from transformers import TrainingArguments

    from chartvlm.config import RewardArguments
    from chartvlm.distributed import world_size
    from chartvlm.prompts import template_variables

    train, grpo = config.train, config.grpo
    renamed = {"gradient_checkpointing", "gradient_checkpointing_kwargs"}  # passed under their new names
    # The Trainer's options, and those TRL's two configs share (loss_type, shuffle_dataset, ...), from config.train.
    shared = {f.name for f in dataclasses.fields(TrainingArguments)} | (
        {f.name for f in dataclasses.fields(GRPOConfig)} & {f.name for f in dataclasses.fields(SFTConfig)})
    options = {f.name: getattr(train, f.name) for f in dataclasses.fields(GRPOConfig)
               if f.init and f.name in shared and f.name not in renamed}
    own = {f.name for f in dataclasses.fields(RewardArguments)}
    options.update({f.name: getattr(grpo, f.name) for f in dataclasses.fields(grpo) if f.init and f.name not in own})
    options.update(generation_batch(config, world_size()), reward_weights=reward_weights,
                   chat_template_kwargs=template_variables(processor),
                   max_completion_length=completion_tokens(config))
    try:
        return GRPOConfig(**options)
    except (ValueError, TypeError, ArithmeticError) as error:
        raise ChartVLMError(f"invalid GRPO configuration: {error}") from None


def check_grpo_config(config: RunConfig) -> None:
    """GRPO's options, the rewards (user modules imported) and TRL's own checks of its config, before any data
    or weights are read: a wrong value costs seconds, not a model load."""
    from chartvlm.rewards import build_rewards

    grpo = config.grpo
    if completion_tokens(config) < 1:
        raise ChartVLMError(f"max_completion_length must be at least 1, got {completion_tokens(config)}")
    if isinstance(grpo.num_generations, bool) or not isinstance(grpo.num_generations, int) or \
            grpo.num_generations < 2:
        raise ChartVLMError(f"num_generations must be a whole number of at least 2 (a group needs two answers to "
                            f"compare), got {grpo.num_generations!r}")
    if not isinstance(grpo.temperature, (int, float)) or not grpo.temperature > 0:
        raise ChartVLMError(f"temperature must be positive (GRPO samples its answers), got {grpo.temperature!r}")
    for name in ("generation_batch_size", "steps_per_generation", "num_iterations"):
        value = getattr(grpo, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ChartVLMError(f"{name} must be a whole number of at least 1, got {value!r}")
    if not isinstance(grpo.beta, (int, float)) or not grpo.beta >= 0:
        raise ChartVLMError(f"beta (the KL coefficient) must not be negative, got {grpo.beta!r}")
    _, weights = build_rewards(grpo.rewards, metric=config.eval.metric, reasoning=config.data.reasoning,
                               max_completion_length=completion_tokens(config),
                               length_penalty_buffer=grpo.length_penalty_buffer)
    args = grpo_arguments(config, None, weights)
    rounds = steps_per_round(args)
    if rounds > 1 and (args.load_best_model_at_end or args.save_strategy == "best"):
        raise ChartVLMError(f"a generation round spans {rounds} optimizer steps and checkpoints are taken at a round's "
                            "end, so the best model's step may have none: keep the best model by evaluating the "
                            "saved checkpoints with chartvlm eval, or make a round one step (generation_batch_size "
                            "= per_device_train_batch_size x gradient_accumulation_steps x processes)")


def end_on_answer_end(model, tokenizer) -> None:
    """Make `<|im_end|>` one of the model's end tokens: TRL stops sampling and cuts completions at the tokens the
    model's generation config declares, and a base checkpoint may declare only <|endoftext|>."""
    from chartvlm.prompts import END_TOKEN

    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    if end not in declared:
        model.generation_config.eos_token_id = [end, *declared]


def round_micro_steps(args: GRPOConfig) -> int:
    """Micro-batches one generation round's completions feed: steps_per_generation, num_iterations times over."""
    return args.steps_per_generation * args.num_iterations


def steps_per_round(args: GRPOConfig) -> int:
    """Optimizer steps from one generation round to the next (an optimizer step takes gradient_accumulation_steps
    micro-batches)."""
    micro_steps = round_micro_steps(args)
    return micro_steps // math.gcd(micro_steps, args.gradient_accumulation_steps)


class SaveAtRoundEnds(TrainerCallback):
    """Checkpoints only where a generation round ends. TRL keeps the round's completions in memory, not in a
    checkpoint: resumed mid-round, it would sample new ones for the rest of the round and the run would no
    longer be the uninterrupted one. A save due mid-round (save_steps, or a signal's) waits for the round's
    last step; those steps train on completions already generated, so the wait is short."""

    def __init__(self, trainer: GRPOTrainer):
        self.trainer = trainer
        self.pending = False

    def at_round_end(self) -> bool:
        # TRL's own micro-step counter decides when it generates (GRPOTrainer._prepare_inputs); it restarts at 0
        # with the process, as a resumed run regenerates.
        return self.trainer._step % round_micro_steps(self.trainer.args) == 0  # noqa: SLF001

    def on_step_end(self, args, state, control, **kwargs):
        if self.at_round_end() or state.global_step >= state.max_steps:
            if self.pending:
                control.should_save, self.pending = True, False
            return control
        if control.should_save:
            control.should_save, self.pending = False, True
        if control.should_training_stop:  # a signal (chartvlm.interrupt): stop, and save, at the round's end
            control.should_training_stop = False
            logger.info("step %d: finishing the generation round before saving", state.global_step)
        return control


class ChartGRPOTrainer(AtomicSaves, GRPOTrainer):
    """GRPOTrainer with chartvlm's saves and resume, one saved adapter, and sample completions in the logs."""

    _samples_shown: list | None = None  # the completions log_samples showed last

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # TRL continues a pretrained adapter against a frozen copy of it (adapter "ref"); only the trained one is
        # the run's result. Checkpoints are saved through here too.
        with saving_only_the_trained_adapter(self.model):
            super().save_model(output_dir, _internal_call)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        train = "loss" in logs and self.model.training
        super().log(logs, start_time)
        if train and self.accelerator.is_main_process:
            self.log_samples()

    def log_samples(self) -> None:
        """The last SAMPLES_PER_LOG completions with their rewards: console and TensorBoard (text); nothing at a
        step of a round whose samples were shown already (completions are generated once per round)."""
        completions = list(self._logs["completion"])[-SAMPLES_PER_LOG:]
        if not completions or completions == self._samples_shown:
            return
        self._samples_shown = completions
        start = len(self._logs["completion"]) - len(completions)
        prompts = list(self._logs["prompt"])[start:]
        rewards = {name: list(values)[start:] for name, values in self._logs["rewards"].items()}
        lines = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            scores = ", ".join(f"{name} {values[i]:.2f}" for name, values in rewards.items())
            lines.append((question_of(prompt), shorten(completion_text(completion)), scores))
        step = self.state.global_step
        for question, text, scores in lines:
            logger.info("step %d sample: Q=%r -> %r (%s)", step, question, text, scores)
        writer = next((callback.tb_writer for callback in self.callback_handler.callbacks
                       if getattr(callback, "tb_writer", None) is not None), None)
        if writer is not None:
            table = ["| question | completion | rewards |", "|---|---|---|"]
            table += [f"| {cell(q)} | {cell(t)} | {cell(s)} |" for q, t, s in lines]
            writer.add_text("completions", "\n".join(table), step)
            writer.flush()


@contextlib.contextmanager
def saving_only_the_trained_adapter(model):
    """While saving, PEFT's save_pretrained writes the trained adapter only, not TRL's reference copy."""
    if len(getattr(model, "peft_config", None) or {}) < 2:
        yield
        return
    model.save_pretrained = functools.partial(model.save_pretrained, selected_adapters=["default"])
    try:
        yield
    finally:
        del model.save_pretrained  # the class's method again


def question_of(prompt: list[dict]) -> str:
    """The question text of a prompt's last user message."""
    for message in reversed(prompt):
        if message["role"] == "user":
            return "".join(part.get("text") or "" for part in message["content"] if part.get("type") == "text")
    return ""


def shorten(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + "..."


def cell(text: str) -> str:
    """Text inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def build_grpo_trainer(model, processor, config: RunConfig, train_data, eval_data=None, callbacks=()):
    """The model made trainable (a new LoRA adapter through TRL, a continued one, or full tuning) and the
    GRPOTrainer that trains it on `train_data`'s questions with the configured rewards."""
    from chartvlm.families import family_of
    from chartvlm.modeling import check_lora_model, log_trainable, lora_config, prepare_for_training
    from chartvlm.rewards import build_rewards
    from chartvlm.train import skip_frozen_vision_backward

    if config.model.attn_implementation != model.config._attn_implementation:  # noqa: SLF001
        model.set_attn_implementation(config.model.attn_implementation)
    if config.grpo.use_vllm:
        import importlib.util

        import torch

        if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
            raise ChartVLMError("use_vllm needs vLLM (pip install vllm) and a CUDA GPU; without them leave it off: "
                                "generation then runs in this process with transformers")
    end_on_answer_end(model, processor.tokenizer)
    family = family_of(model)
    functions, weights = build_rewards(config.grpo.rewards, metric=config.eval.metric,
                                       reasoning=config.data.reasoning, max_completion_length=completion_tokens(config),
                                       length_penalty_buffer=config.grpo.length_penalty_buffer)
    args = grpo_arguments(config, processor, weights)
    fresh_adapter = config.model.tuning != "full" and not config.model.init_adapter
    model = prepare_for_training(model, config.model, new_adapter=not fresh_adapter)
    logger.info("GRPO: %d completions per question, %d per generation round, at most %d new tokens each, beta %g; "
                "rewards %s", args.num_generations, args.generation_batch_size, args.max_completion_length, args.beta,
                ", ".join(f"{name} x{weight:g}" for name, weight in zip(config.grpo.rewards, weights, strict=True)))
    trainer = ChartGRPOTrainer(
        model=model, reward_funcs=functions, args=args, train_dataset=prompt_rows(train_data, processor,
                                                                                   config.data.system_message),
        eval_dataset=None if eval_data is None else prompt_rows(eval_data, processor, config.data.system_message),
        processing_class=processor, callbacks=list(callbacks),
        peft_config=lora_config(config.model, family) if fresh_adapter else None)
    if fresh_adapter:  # TRL put the adapter on: the same checks as chartvlm's own wrapping
        check_lora_model(trainer.model, family)
        log_trainable(trainer.model, config.model.tuning)
    skip_frozen_vision_backward(trainer.model)
    rounds = steps_per_round(args)
    if rounds > 1:
        trainer.add_callback(SaveAtRoundEnds(trainer))  # after the interrupt callback: it may defer that one's stop
        logger.info("a generation round spans %d optimizer steps: checkpoints are taken at a round's end", rounds)
    return trainer
