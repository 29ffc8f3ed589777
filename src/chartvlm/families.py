"""The Qwen vision-language families chartvlm supports: one row each, asked by every stage.

Collate, sequence lengths, generation, training, export and bench ask this table (through `family_of`)
for what differs between families, instead of assuming Qwen2.5-VL; FLOPs are counted from each model's own
config (`chartvlm.flops`). Adding a family is one row here, its published chat template in `templates/`, and a
tiny preset in `modelinit`.

What the families share: the chat format (`<|im_start|>role\\n...<|im_end|>\\n`), one image placeholder
`<|vision_start|><|image_pad|><|vision_end|>` that the processor expands to one token per merged patch,
M-RoPE positions, and the module layout of transformers 5 (`model.visual`, `model.language_model`,
`lm_head`). What differs is below.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from chartvlm.errors import ChartVLMError


@dataclass(frozen=True)
class AddedToken:
    """A control token of a family's tokenizer: its text, its id in the released checkpoints (None where no
    public source confirms it), and whether the tokenizer marks it special (skipped when decoding)."""

    content: str
    id: int | None
    special: bool = True


def _tokens(first_id: int, names: list[str], special: bool = True) -> tuple[AddedToken, ...]:
    return tuple(AddedToken(name, first_id + i, special) for i, name in enumerate(names))


# Qwen2/2.5/3 share Qwen-1's vocabulary (151,643 byte-level BPE pieces) and these control tokens.
_QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN2_TEXT = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]
_QWEN3_TEXT = ["<tool_response>", "</tool_response>", "<think>", "</think>"]
QWEN2_TOKENS = _tokens(151643, _QWEN2_SPECIAL) + _tokens(151657, _QWEN2_TEXT, special=False)
QWEN3_TOKENS = QWEN2_TOKENS + _tokens(151665, _QWEN3_TEXT, special=False)
# Qwen3.5 has its own 248,320-token vocabulary; only these ids are confirmed by its published config.json
# and tokenizer fixtures. <think> and </think> are added tokens there too, at ids we could not confirm.
QWEN3_5_TOKENS = (
    _tokens(248044, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    + _tokens(248053, ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"])
    + (AddedToken("<think>", None, special=False), AddedToken("</think>", None, special=False))
)


@dataclass(frozen=True)
class Family:
    model_type: str             # config.model_type of the checkpoints
    title: str
    model_class: str            # transformers class names
    config_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int             # vision patch side in pixels; one image token per (patch * merge)^2 pixels
    tokens: tuple[AddedToken, ...]
    template: str               # templates/<name>.jinja, the published chat template
    # The published vocabulary (dashscope's qwen.tiktoken) is this family's: `--tokenizer qwen` builds it.
    real_vocabulary: bool
    # LoRA targets `lora_target_modules: auto` picks: the seed's query and value projections, in every layer of
    # the language model (never the vision tower). Qwen3.5's linear-attention layers (3 of every 4) have no
    # q_proj/v_proj: their fused query-key-value projection is in_proj_qkv.
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    # Module names (suffixes) of the vision tower and of the projector(s) feeding the language model (Qwen3-VL's
    # DeepStack mergers feed features of several vision layers into the first text layers).
    vision_tower: str = "visual"
    projectors: tuple[str, ...] = ("merger",)
    moe: bool = False           # experts are fused 3-D parameters (no nn.Linear): LoRA target_modules miss them
    # Gated DeltaNet layers: their CPU code cannot keep packed samples apart (no padding-free packing).
    linear_attention: bool = False
    # The released image processors' normalisation (None: Qwen2VLImageProcessor's CLIP defaults).
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    merge_size: int = 2
    end_token: str = "<|im_end|>"   # closes every turn; generation stops on it
    pad_token: str = "<|endoftext|>"
    image_token: str = "<|image_pad|>"

    @property
    def pixels_per_token(self) -> int:
        return (self.patch_size * self.merge_size) ** 2

    def chat_template(self, variant: str | None = None) -> str:
        """The published chat template, byte for byte."""
        name = variant or self.template
        return resources.files("chartvlm").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


# Qwen3-VL's and Qwen3.5's preprocessor_config.json normalise pixels to [-1, 1].
_HALF = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}

FAMILIES: dict[str, Family] = {family.model_type: family for family in (
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLProcessor",
           "Qwen2VLVideoProcessor", 14, QWEN2_TOKENS, "qwen2_vl", real_vocabulary=True),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
           "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14, QWEN2_TOKENS, "qwen2_vl", real_vocabulary=True),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "Qwen3VLProcessor",
           "Qwen3VLVideoProcessor", 16, QWEN3_TOKENS, "qwen3_vl", real_vocabulary=True,
           projectors=("merger", "deepstack_merger_list"), **_HALF),
    Family("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
           "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16, QWEN3_TOKENS, "qwen3_vl", real_vocabulary=True,
           projectors=("merger", "deepstack_merger_list"), moe=True, **_HALF),
    # Chart answers are non-thinking: rendered with enable_thinking=False (prompts.render), both Qwen3.5 templates
    # end the generation prompt with an empty <think>\n\n</think>\n\n block, and a trained answer follows it.
    Family("qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Config", "Qwen3VLProcessor",
           "Qwen3VLVideoProcessor", 16, QWEN3_5_TOKENS, "qwen3_5_nothink", real_vocabulary=False,
           lora_targets=("q_proj", "v_proj", "in_proj_qkv"), linear_attention=True, **_HALF),
    Family("qwen3_5_moe", "Qwen3.5-MoE", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig",
           "Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16, QWEN3_5_TOKENS, "qwen3_5_think", real_vocabulary=False,
           lora_targets=("q_proj", "v_proj", "in_proj_qkv"), moe=True, linear_attention=True, **_HALF),
)}


def family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ChartVLMError(f"model type {model_type!r} is not a supported Qwen vision-language family; "
                            f"supported: {', '.join(FAMILIES)}") from None


def family_of(model_or_config) -> Family:
    """The family of a model, a PEFT model or a config."""
    config = getattr(model_or_config, "config", model_or_config)
    return family(config.model_type)
