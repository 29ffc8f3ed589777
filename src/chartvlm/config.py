"""Configuration: typed dataclasses are the single source of defaults.

The defaults are the seed recipe's (see DEVELOPERS.md and configs/seed.yaml). A YAML file given with
`--config` overrides them, and command-line flags override the file. Every TRL/Trainer argument is
reachable because `TrainConfig` *is* an `SFTConfig`. Unknown keys are errors that list close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from trl import SFTConfig, TrlParser

from chartvlm.errors import ChartVLMError
from chartvlm.prompts import REASONING_SYSTEM_MESSAGE, SYSTEM_MESSAGE

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "chartvlm_config.yaml"

# Qwen2.5-VL turns every 28x28 pixel block into one token. 1280 tokens per image keeps the largest
# ChartQA chart (800x1796) readable while bounding memory; the processor's own default (16,384
# tokens) is a common cause of OOM.
PIXELS_PER_TOKEN = 28 * 28
DEFAULT_MIN_PIXELS = 4 * PIXELS_PER_TOKEN
DEFAULT_MAX_PIXELS = 1280 * PIXELS_PER_TOKEN
# How `chartvlm eval` gets its answers: generated here, or asked of an OpenAI-compatible server.
BACKENDS = ("inprocess", "openai")
# How `chartvlm train` trains: supervised fine-tuning on the labels, or GRPO with the ChartQA metric as the reward.
METHODS = ("sft", "grpo")
# The options `reasoning` sets when the user leaves them alone (apply_reasoning_defaults).
REASONING_DERIVED = ("system_message", "max_new_tokens", "eval_max_new_tokens")
# TRL's GRPO losses (GRPOConfig.loss_type's help), its default first. SFT has one: the answer-only cross-entropy.
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# New tokens a reasoning answer may take (<think>...</think> then the answer) when max_completion_length is not set;
# without reasoning a completion gets eval_max_new_tokens, as evaluation does.
REASONING_MAX_NEW_TOKENS = 1024


@dataclass
class DataArguments:
    """Which data to train and evaluate on."""

    dataset: str = field(
        default="HuggingFaceM4/ChartQA",
        metadata={"help": "Hub id, save_to_disk folder, parquet file/folder, ChartQA release folder or .jsonl."},
    )
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: str = field(default="val", metadata={"help": "Split used for the periodic eval loss."})
    test_split: str = field(default="test", metadata={"help": "Split `chartvlm eval` scores by default."})
    subset: float | None = field(
        default=0.01,
        metadata={"help": "Train (and compute the eval loss) on a deterministic subset: a fraction in (0, 1] or a "
                          "row count (> 1)."},
    )
    test_subset: float | None = field(
        default=None,
        metadata={"help": "`chartvlm eval` scores the whole test split unless this picks a deterministic subset "
                          "(a fraction or a row count, drawn with subset_seed)."},
    )
    subset_seed: int = field(default=42, metadata={"help": "Seed that picks the subset."})
    system_message: str = field(
        default=SYSTEM_MESSAGE, metadata={"help": "System prompt used for training, evaluation and inference."}
    )
    reasoning: bool = field(
        default=False,
        metadata={"help": "Answers come after reasoning in <think>...</think>: the system prompt asks for it (unless "
                          "system_message is set), the format reward checks it, answers are taken after the block, "
                          "and generation gets max_completion_length new tokens (default 1024)."},
    )
    allow_outside_images: bool = field(
        default=False,
        metadata={"help": "Accept image paths in JSON/JSONL data that leave the data's folder (../, absolute)."},
    )
    on_bad_sample: str | None = field(
        default=None,
        metadata={"help": "skip | error: what a bad row (unreadable image, no question or answer, broken line) does. "
                          "Default: skip for training (counted, listed in skipped.jsonl), error for evaluation "
                          "(a metric is never computed on a silently smaller set).", "choices": ["skip", "error"]},
    )

    def __post_init__(self):
        if self.on_bad_sample not in (None, "skip", "error"):
            raise ChartVLMError(f"on_bad_sample must be skip or error (or unset for the defaults), "
                                f"got {self.on_bad_sample!r}")
        for name in ("subset", "test_subset"):
            value = getattr(self, name)
            if value is None:
                continue
            if value <= 0 or (value > 1 and value != int(value)):
                raise ChartVLMError(f"{name} must be a fraction in (0, 1] or a whole row count > 1, got {value}")
            if value > 1:  # flags and YAML give floats; a count must reach the loader as an int
                setattr(self, name, int(value))


@dataclass
class ModelArguments:
    """Which model to fine-tune and how."""

    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "Hub id or local folder of a Qwen2.5-VL model."}
    )
    tuning: str = field(
        default="lora",
        metadata={"help": "lora | qlora (4-bit base, CUDA only) | full", "choices": ["lora", "qlora", "full"]},
    )
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "Continue training this LoRA adapter (an SFT run's output folder, for GRPO after SFT) "
                          "instead of a new one; model_name_or_path must be its base. LoRA/QLoRA only: for full "
                          "tuning merge it first (chartvlm export)."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Module names, 'all-linear', or 'auto' (the family's query/value projections in every "
                          "layer) to adapt. Restricted to the language model unless --lora_include_vision."},
    )
    lora_include_vision: bool = field(
        default=False, metadata={"help": "Also put LoRA on matching vision-tower modules."}
    )
    train_projector: bool = field(
        default=False, metadata={"help": "Train the projector(s) from the vision tower into the language model "
                                         "(the merger; Qwen3-VL's deepstack mergers too), the tower itself frozen."}
    )
    train_vision_tower: bool = field(
        default=False, metadata={"help": "Train the whole vision tower instead of freezing it (with LoRA it is "
                                         "saved with the adapter, as PEFT modules_to_save)."}
    )
    min_pixels: int = field(default=DEFAULT_MIN_PIXELS, metadata={"help": "Smallest image area after resizing."})
    max_pixels: int = field(
        default=DEFAULT_MAX_PIXELS, metadata={"help": "Largest image area after resizing (28*28 pixels per token)."}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa | eager | flash_attention_2"})

    def __post_init__(self):
        if self.tuning != "full" and self.train_vision_tower and self.lora_include_vision:
            raise ChartVLMError("train_vision_tower trains the whole vision tower (saved with the adapter) and "
                                "lora_include_vision puts LoRA on it: choose one")
        if self.init_adapter and self.tuning == "full":
            raise ChartVLMError("init_adapter continues a LoRA adapter; for full tuning merge it into its base first "
                                "(chartvlm export --adapter FOLDER --out MERGED) and train MERGED")
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ChartVLMError("lora_r and lora_alpha must be positive")
        if not 0 <= self.lora_dropout < 1:
            raise ChartVLMError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.min_pixels <= 0 or self.max_pixels < self.min_pixels:
            raise ChartVLMError(
                f"need 0 < min_pixels <= max_pixels, got min_pixels={self.min_pixels} max_pixels={self.max_pixels}"
            )


@dataclass
class EvalArguments:
    """Generation and evaluation settings."""

    max_new_tokens: int = field(
        default=128, metadata={"help": "The seed's MAX_SEQ_LEN: new-token limit for sample generation and predict."}
    )
    eval_max_new_tokens: int = field(
        default=32, metadata={"help": "New-token limit for `chartvlm eval` (ChartQA answers need ~16)."}
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Questions per generation batch."})
    prompt_style: str = field(
        default="chartvlm",
        metadata={"help": "chartvlm (the training prompt) | lmms-eval | vlmevalkit: those harnesses' ChartQA prompt, "
                          "image sizes and decoding, to compare a base model with published scores.",
                  "choices": ["chartvlm", "lmms-eval", "vlmevalkit"]},
    )
    generation_config: str | None = field(
        default=None,
        metadata={"help": "chartvlm (pure greedy, nothing from the checkpoint) | checkpoint (the checkpoint's "
                          "generation_config.json as it is) | checkpoint-greedy (its fields, greedy forced). "
                          "Default: the prompt style's (chartvlm; checkpoint-greedy for lmms-eval).",
                  "choices": ["chartvlm", "checkpoint", "checkpoint-greedy"]},
    )
    metric: str = field(
        default="relaxed",
        metadata={"help": "relaxed (standard) | relaxed_swapped | lenient",
                  "choices": ["relaxed", "relaxed_swapped", "lenient"]},
    )
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder to apply on the model."})
    compare_model: str | None = field(
        default=None, metadata={"help": "Second model folder/id to evaluate in the same run (e.g. the base)."}
    )
    compare_adapter: str | None = field(default=None, metadata={"help": "Adapter for the compared model."})
    force_adapter: bool = field(
        default=False,
        metadata={"help": "Apply an adapter even though it was trained on a different base model than the one "
                          "given (by default that is an error)."},
    )
    eval_output_dir: str = field(default="output/eval", metadata={"help": "Where predictions and metrics go."})
    report: bool = field(default=True, metadata={"help": "Write report.html next to metrics.json."})
    backend: str = field(
        default="inprocess",
        metadata={"help": "inprocess (load the model and generate here) | openai (ask an OpenAI-compatible server: "
                          "chartvlm serve, vllm serve, SGLang; model_name_or_path then only gives the processor and "
                          "the trained settings, no weights are loaded).", "choices": list(BACKENDS)},
    )
    base_url: str | None = field(
        default=None,
        metadata={"help": "backend openai: the server's address, e.g. http://127.0.0.1:8000 (or .../v1)."},
    )
    served_model: str | None = field(
        default=None,
        metadata={"help": "backend openai: the model name to ask for (default: the only one the server lists in "
                          "/v1/models)."},
    )
    request_concurrency: int = field(
        default=8, metadata={"help": "backend openai: requests in flight at once (the server batches them)."}
    )
    request_timeout: float = field(
        default=300.0, metadata={"help": "backend openai: seconds one request may take, per try."}
    )
    request_retries: int = field(
        default=5,
        metadata={"help": "backend openai: tries after the first for 429, 5xx and connection errors, with "
                          "exponential backoff (a Retry-After header is honoured)."},
    )

    def __post_init__(self):
        if self.prompt_style not in ("chartvlm", "lmms-eval", "vlmevalkit"):
            raise ChartVLMError(f"prompt_style must be chartvlm, lmms-eval or vlmevalkit, got {self.prompt_style!r}")
        if self.generation_config not in (None, "chartvlm", "checkpoint", "checkpoint-greedy"):
            raise ChartVLMError("generation_config must be chartvlm, checkpoint or checkpoint-greedy, got "
                                f"{self.generation_config!r}")
        for name in ("max_new_tokens", "eval_max_new_tokens", "eval_batch_size", "request_concurrency"):
            if getattr(self, name) < 1:
                raise ChartVLMError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise ChartVLMError(f"backend must be {' or '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai" and not self.base_url:
            raise ChartVLMError("backend openai needs --base_url, the server's address (e.g. http://127.0.0.1:8000)")
        if self.base_url and not re.match(r"^https?://[^/\s]+", self.base_url):
            raise ChartVLMError(f"base_url must be an http:// or https:// address, got {self.base_url!r}")
        if self.request_timeout <= 0 or self.request_retries < 0:
            raise ChartVLMError("request_timeout must be positive and request_retries at least 0, got "
                                f"{self.request_timeout} and {self.request_retries}")


@dataclass
class TrainConfig(SFTConfig):
    """SFTConfig with the seed recipe's values as defaults (every Trainer/TRL argument stays reachable)."""

    method: str = field(
        default="sft",
        metadata={"help": "sft (supervised, on the labels) | grpo (reinforcement learning, TRL's GRPOTrainer, with "
                          "the ChartQA metric as the reward; its options are those of the grpo section)",
                  "choices": list(METHODS)},
    )
    output_dir: str = field(default="output", metadata={"help": "Where checkpoints and the final model go."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training subset."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "Eval-loss batch size per device."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    optim: str = field(
        default="paged_adamw_32bit",
        metadata={"help": "Optimizer; paged_* need bitsandbytes + CUDA and fall back to adamw_torch otherwise."},
    )
    # transformers 5.23 renamed gradient_checkpointing* to activation_checkpointing*; both names are
    # accepted. The seed's "on" (non-reentrant) is applied in __post_init__ only when neither is set,
    # so a user's `gradient_checkpointing: false` is never overridden by a default of the new name.
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in backward (gradient checkpointing). Default: on."}
    )
    activation_checkpointing_kwargs: dict | str | None = field(
        default=None, metadata={"help": 'Default {"use_reentrant": false}.'}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of activation_checkpointing."}
    )
    gradient_checkpointing_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Old name of activation_checkpointing_kwargs."}
    )
    logging_steps: float = field(default=50, metadata={"help": "Log every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "no | steps | epoch"})
    eval_steps: float | None = field(default=50, metadata={"help": "Eval loss every N steps."})
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N steps."})
    max_length: int | None = field(
        default=2048,
        metadata={"help": "Longest training sequence in tokens. Longer samples are DROPPED (counted), never "
                          "truncated: cutting image tokens breaks the model."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: on where CUDA supports it."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Must stay False: the collator needs the raw rows."})
    report_to: str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard | wandb | none | ..."})
    dataset_kwargs: dict | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True},
        metadata={"help": "Our collator builds the batches; TRL's preparation is skipped."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Padding-free training: the samples of a step end to end in one row, packed into bins of "
                          "max_length tokens; per_device_train_batch_size counts bins (chartvlm.packing)."},
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the last checkpoint in output_dir."})
    # Options SFTConfig and GRPOConfig both have, with different values: each method gets its own default.
    loss_type: str | None = field(
        default=None,
        metadata={"help": "sft: nll (the only one: chartvlm's answer-only cross-entropy). grpo: one of TRL's GRPO "
                          "losses (" + ", ".join(GRPO_LOSS_TYPES) + "). Default: nll for sft, dapo (TRL's) for grpo."},
    )
    shuffle_dataset: bool | None = field(
        default=None,
        metadata={"help": "grpo: draw the questions in a shuffled order (default: true, as TRL). sft: unused (the "
                          "Trainer's sampler orders the samples)."},
    )
    full_logits_loss: bool = field(
        default=False,
        metadata={"help": "Project every position onto the vocabulary and take the model's own loss, as the seed "
                          "recipe did. Same loss and gradients as the default, which runs the LM head only on the "
                          "supervised answer tokens; slower and far more memory. Kept for `chartvlm bench`."},
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ChartVLMError(f"method must be {' or '.join(METHODS)}, got {self.method!r}")
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        if self.activation_checkpointing_kwargs is None and self.gradient_checkpointing_kwargs is None:
            # Reentrant checkpointing leaves a frozen-entry LoRA without gradients (PEFT #2880).
            self.activation_checkpointing_kwargs = {"use_reentrant": False}
        if self.bf16 is None:
            import torch

            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.max_length is not None and self.max_length <= 0:
            raise ChartVLMError(f"max_length must be positive or null, got {self.max_length}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ChartVLMError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate < 0:
            raise ChartVLMError(f"learning_rate must not be negative, got {self.learning_rate}")
        if self.packing and self.max_length is None:
            raise ChartVLMError("packing needs max_length: the token budget of each packed row")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ChartVLMError(f"num_train_epochs must be positive (or set max_steps), got {self.num_train_epochs}")
        # Checked when training starts (train.check_config): evaluating with a run's saved file needs no loss.
        self.loss_type = self.loss_type or self.loss_types()[0]
        if self.shuffle_dataset is None:
            self.shuffle_dataset = self.method == "grpo"
        super().__post_init__()

    def loss_types(self) -> tuple[str, ...]:
        """The losses `method` trains with, its default first."""
        return GRPO_LOSS_TYPES if self.method == "grpo" else ("nll",)


# The ChartQA rewards chartvlm has (chartvlm.rewards); a "module:function" entry names a user's own.
DEFAULT_REWARDS = {"relaxed_accuracy": 1.0, "format": 0.5}
# GRPOConfig options that are chartvlm's to set: the weights come with the rewards, and the chat template's
# variables are the ones evaluation renders with (prompts.template_variables), so training and evaluation prompts
# stay identical. The other two are deprecated names.
_GRPO_OPTIONS_LEFT_OUT = {"reward_weights", "chat_template_kwargs", "vllm_importance_sampling_cap",
                          "use_transformers_paged"}
# GRPO defaults that differ from TRL's, with the reason in their help text.
_GRPO_DEFAULTS = {
    "beta": (0.04, "KL coefficient against the starting model (TRL's default: 0). chartvlm keeps DeepSeekMath's "
                   "0.04: the policy stays near the model whose chart reading it starts from, and the KL is logged."),
    "max_completion_length": (None, "New tokens per completion. Default: eval_max_new_tokens (32: a ChartQA answer "
                                    "is a few tokens), or 1024 with reasoning."),
    "disable_dropout": (True, "Turn dropout off (LoRA's too) while training (TRL's default: off): the importance "
                              "ratio and the KL compare log-probabilities of the same tokens from two forward passes, "
                              "and dropout would make them differ by noise alone."),
}


@dataclass
class RewardArguments:
    """The GRPO rewards (chartvlm.rewards)."""

    rewards: dict | str | None = field(
        default_factory=lambda: dict(DEFAULT_REWARDS),
        metadata={"help": "Reward name -> weight, summed into the reward GRPO maximises: relaxed_accuracy (the "
                          "ChartQA metric of the answer, best over the labels), format (a bare answer; with reasoning "
                          "<think>...</think> then the answer), length_penalty (DAPO's soft overlong penalty), or "
                          "'module:function' for your own. A JSON object on the command line."},
    )
    length_penalty_buffer: int | None = field(
        default=None,
        metadata={"help": "length_penalty: the last this many tokens before max_completion_length cost 0 -> -1 "
                          "linearly; a completion cut at the limit gets -1. Default: a quarter of the limit."},
    )

    def __post_init__(self):
        if isinstance(self.rewards, str):
            try:
                self.rewards = json.loads(self.rewards)
            except json.JSONDecodeError as error:
                raise ChartVLMError(f"rewards must be a JSON object of name: weight, got {self.rewards!r} ({error})") \
                    from None
        if not isinstance(self.rewards, dict) or not self.rewards:
            raise ChartVLMError(f"rewards must be a non-empty mapping of reward name: weight, got {self.rewards!r}")
        for name, weight in self.rewards.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ChartVLMError(f"rewards: the weight of {name!r} must be a finite number, got {weight!r}")
        if self.length_penalty_buffer is not None and self.length_penalty_buffer < 1:
            raise ChartVLMError(f"length_penalty_buffer must be at least 1, got {self.length_penalty_buffer}")


@functools.cache
def grpo_arguments() -> type:
    """The grpo section: RewardArguments and every GRPOConfig option SFTConfig lacks (num_generations, beta,
    temperature, use_vllm, ...), with TRL's help texts and defaults but those in _GRPO_DEFAULTS. Built from TRL's
    own dataclass, so every GRPO option stays reachable as it is for SFT; the options both configs have
    (loss_type, shuffle_dataset, ...) are TrainConfig's, with a default per method."""
    import typing

    from trl import GRPOConfig

    own = {f.name for f in dataclasses.fields(SFTConfig)} | _GRPO_OPTIONS_LEFT_OUT
    types = typing.get_type_hints(GRPOConfig)
    options = []
    for option in dataclasses.fields(GRPOConfig):
        if not option.init or option.name in own:
            continue
        metadata = dict(option.metadata)
        if option.name in _GRPO_DEFAULTS:
            default, metadata["help"] = _GRPO_DEFAULTS[option.name]
            spec = field(default=default, metadata=metadata)
        elif option.default_factory is not dataclasses.MISSING:
            spec = field(default_factory=option.default_factory, metadata=metadata)
        else:
            spec = field(default=option.default, metadata=metadata)
        options.append((option.name, types[option.name], spec))
    return dataclasses.make_dataclass("GRPOArguments", options, bases=(RewardArguments,))


@dataclass
class RunConfig:
    """Everything one command needs, resolved. `explicit`: the options a YAML file or a flag set (the others are
    defaults), so settings a trained model carries are inherited unless the user chose otherwise."""

    data: DataArguments
    model: ModelArguments
    eval: EvalArguments
    train: TrainConfig
    grpo: RewardArguments = None  # a grpo_arguments() instance (train.method grpo)
    explicit: frozenset[str] = frozenset()

    def __post_init__(self):
        if self.grpo is None:
            self.grpo = grpo_arguments()()

    def to_dict(self) -> dict:
        train = {k: v for k, v in self.train.to_dict().items() if not k.startswith("_")}
        return {
            "data": dataclasses.asdict(self.data),
            "model": dataclasses.asdict(self.model),
            "eval": dataclasses.asdict(self.eval),
            "train": train,
            "grpo": dataclasses.asdict(self.grpo),
        }

    def save(self, folder: str | Path) -> Path:
        """Write the resolved configuration into a run's output folder (atomically)."""
        from chartvlm.io import atomic_write_text

        path = Path(folder) / CONFIG_FILENAME
        return atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))


def sections() -> tuple[type, ...]:
    return DataArguments, ModelArguments, EvalArguments, TrainConfig, grpo_arguments()


def _known_options() -> list[str]:
    return sorted({f.name for cls in sections() for f in dataclasses.fields(cls) if f.init})


def _unknown_key_error(unknown: list[str], origin: str, prog: str = "chartvlm train") -> ChartVLMError:
    known = _known_options()
    lines = []
    for key in unknown:
        hints = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
        lines.append(f"  {key}{hint}")
    return ChartVLMError(f"unknown configuration key(s) in {origin}:\n" + "\n".join(lines)
                         + f"\nRun `{prog} --help` for every option.")


_NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--learning_rate -1e-4` -> `--learning_rate=-1e-4`: argparse reads a value starting with '-' that is not
    a plain number as the next option and prints a usage dump; attached, the value reaches the check that
    explains what is wrong with it."""
    joined: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and "=" not in token and i + 1 < len(argv) and _NEGATIVE_NUMBER.match(argv[i + 1]):
            joined.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        joined.append(token)
        i += 1
    return joined


def _flatten_yaml(config: dict, path: str) -> dict:
    """Accept both flat files and files grouped by section (data:/model:/eval:/train:), as we write them."""
    flat = {}
    for key, value in config.items():
        if key in ("data", "model", "eval", "train", "grpo") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_config(argv: list[str] | None = None, prog: str = "chartvlm") -> RunConfig:
    """Resolve defaults < YAML (`--config`) < flags into a RunConfig; unknown keys raise ChartVLMError."""
    argv = _attach_negative_numbers(list(argv or []))
    # No abbreviations: `--learning_rat 0.5` must be an unknown key, not a silent learning_rate.
    parser = TrlParser(sections(), prog=prog, allow_abbrev=False)
    explicit = {token[2:].split("=")[0] for token in argv if token.startswith("--") and token != "--config"}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ChartVLMError("--config needs a YAML file path")
        config_path = Path(argv[i + 1])
        del argv[i : i + 2]
        if not config_path.is_file():
            raise ChartVLMError(f"config file not found: {config_path}")
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ChartVLMError(f"{config_path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ChartVLMError(f"{config_path}: must hold a YAML mapping of option: value")
        values = _flatten_yaml(loaded, str(config_path))
        unknown = sorted(set(values) - set(_known_options()))
        if unknown:
            raise _unknown_key_error(unknown, str(config_path), prog)
        parser.set_defaults_with_config(**values)
        explicit |= set(values)
    try:
        data, model, evaluation, train, grpo, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except ValueError as exc:  # TrainingArguments' own cross-field checks
        raise ChartVLMError(f"invalid configuration: {exc}") from None
    if rest:
        flags = [r.lstrip("-").split("=")[0] for r in rest if r.startswith("-")]
        raise _unknown_key_error(flags or rest, "the command line", prog)
    config = RunConfig(data=data, model=model, eval=evaluation, train=train, grpo=grpo, explicit=frozenset(explicit))
    apply_reasoning_defaults(config)
    if train.method == "grpo" and "eval_strategy" not in explicit:
        # The seed's periodic eval loss is SFT's; GRPO's evaluation samples num_generations answers per question.
        train.eval_strategy = "no"
    return config


def completion_tokens(config: RunConfig) -> int:
    """New tokens one GRPO completion may take: max_completion_length, else what evaluation generates."""
    if config.grpo.max_completion_length is not None:
        return config.grpo.max_completion_length
    return REASONING_MAX_NEW_TOKENS if config.data.reasoning else config.eval.eval_max_new_tokens


def apply_reasoning_defaults(config: RunConfig) -> None:
    """With reasoning, options the user left alone follow it: the reasoning system prompt, and room for the
    reasoning in every generation (evaluation, predict, samples); a trained folder records them for later runs
    (settings.resolve: a `reasoning` flag that differs from the folder's brings these values with it)."""
    if not config.data.reasoning:
        return
    if "system_message" not in config.explicit:
        config.data.system_message = REASONING_SYSTEM_MESSAGE
    room = completion_tokens(config)
    for name in REASONING_DERIVED[1:]:
        if name not in config.explicit:
            setattr(config.eval, name, room)


def load_run_config(folder: str | Path) -> dict:
    """Read the resolved configuration a run saved (for eval/export of a trained folder)."""
    path = Path(folder) / CONFIG_FILENAME
    return yaml.safe_load(path.read_text()) if path.is_file() else {}
