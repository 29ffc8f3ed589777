"""The one place that turns a ChartQA row into chat messages.

Training, evaluation and inference all call `format_data` (or `build_messages`), so the system
prompt, the message layout and the image are identical everywhere: prompt drift between training
and evaluation is a classic silent accuracy loss.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from chartvlm.errors import BadSampleError, ChartVLMError

# Closes every turn in every Qwen chat template: the last supervised token, where generation stops.
END_TOKEN = "<|im_end|>"
# Chart answers are short and non-thinking. Qwen3.5's templates read enable_thinking (False: the generation
# prompt ends with an empty <think></think> block); the other families' templates ignore it.
TEMPLATE_KWARGS = {"enable_thinking": False}

SYSTEM_MESSAGE = (
    "You answer questions about chart images. Read the chart carefully (axes, legend, labels and "
    "values) and reply with only the answer: a single word, a number or a short phrase, with no "
    "explanation. Write numbers without thousands separators or units."
)
# The tags of that block (single tokens in Qwen3's vocabularies, plain text in Qwen2's).
REASONING_TAGS = ("<think>", "</think>")
# With `reasoning: true` (GRPO): the reasoning comes first, in a block `extract_answer` removes.
REASONING_SYSTEM_MESSAGE = (
    "You answer questions about chart images. Read the chart carefully (axes, legend, labels and "
    "values). First reason step by step inside <think> and </think>. After </think>, reply with only "
    "the answer: a single word, a number or a short phrase, with no explanation. Write numbers "
    "without thousands separators or units."
)


@dataclass(frozen=True)
class PromptStyle:
    """How questions are put to a model. `chartvlm` is how chartvlm trains and evaluates; `lmms-eval` and
    `vlmevalkit` reproduce those harnesses' ChartQA prompts and image handling, so a base model's score is
    comparable with published ones (../shared/reference/chartqa.md has the facts and their sources).

    system: the configured system prompt is sent (else none: the template adds its default, if any).
    suffix: appended to every question. pixels: the processor's (min, max) pixels (None: the configured ones).
    pre_resize: (min, max) pixels of qwen_vl_utils.fetch_image, which the harnesses run before the processor:
    each side rounded to a multiple of patch x merge, the area clamped. plain_rgb: convert images with PIL's
    convert("RGB") (transparency dropped, as lmms-eval does) instead of compositing on white.
    max_new_tokens: fixed by the harness (None: the configured one). generation: `chartvlm` (pure greedy,
    nothing from the checkpoint) or `checkpoint-greedy` (the checkpoint's generation_config.json, e.g. its
    repetition_penalty, with greedy decoding and stop on <|im_end|> forced, as lmms-eval does)."""

    name: str
    system: bool = True
    suffix: str = ""
    pixels: tuple[int, int] | None = None
    pre_resize: tuple[int, int] | None = None
    plain_rgb: bool = False
    max_new_tokens: int | None = None
    generation: str = "chartvlm"

    def question(self, query: str, family_name: str | None = None) -> str:
        if self.name == "vlmevalkit" and family_name == "qwen2_vl":
            # VLMEvalKit's Qwen2-VL wrapper replaces the dataset prompt with its own (vlm/qwen2_vl/prompt.py).
            return query + "\nPlease try to answer the question with short words or phrases if possible."
        return query + self.suffix


PROMPT_STYLES = {
    "chartvlm": PromptStyle("chartvlm"),
    # lmms-eval 0.7.3, task chartqa, backend qwen2_5_vl (its chat class): no system turn, the question and the
    # task's post_prompt, fetch_image's own limits then the backend's min/max pixels, 16 new tokens, greedy.
    "lmms-eval": PromptStyle("lmms-eval", system=False, suffix="\nAnswer the question with a single word.",
                             pixels=(256 * 28 * 28, 2048 * 28 * 28), pre_resize=(4 * 28 * 28, 16384 * 28 * 28),
                             plain_rgb=True, max_new_tokens=16, generation="checkpoint-greedy"),
    # VLMEvalKit, ChartQA_TEST with its Qwen2-VL wrapper: the dataset's prompt, min/max pixels passed with each
    # image (fetch_image) and the released processor's limits after it, greedy (top_k 1), repetition_penalty 1.
    "vlmevalkit": PromptStyle("vlmevalkit", system=False, suffix="\nAnswer the question using a single word or phrase.",
                              pixels=(4 * 28 * 28, 16384 * 28 * 28), pre_resize=(1280 * 28 * 28, 16384 * 28 * 28),
                              max_new_tokens=2048),
}


def prompt_style(name: str) -> PromptStyle:
    try:
        return PROMPT_STYLES[name]
    except KeyError:
        raise ChartVLMError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {name!r}") from None


_REASONING_BLOCK = re.compile(r"<(think|analysis)>.*?</\1>", re.DOTALL)
_REASONING_END = re.compile(r"^.*</(think|analysis)>", re.DOTALL)


def extract_answer(generated: str) -> str:
    """The answer in a decoded generation: complete <think>/<analysis> blocks removed, the text after a lone
    closing tag kept, whitespace stripped (as lmms-eval scores; a plain answer comes back stripped)."""
    text = _REASONING_BLOCK.sub("", generated)
    text = _REASONING_END.sub("", text)
    return text.strip()


def build_messages(image, query: str, answer: str | None = None, system_message: str | None = SYSTEM_MESSAGE
                   ) -> list[dict]:
    """system / user(image + question) [/ assistant(answer)] messages in the chat-template format. With
    system_message None there is no system turn (the template adds its default one, if it has one)."""
    messages = [] if system_message is None else [
        {"role": "system", "content": [{"type": "text", "text": system_message}]}]
    messages.append({"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": query}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def format_data(sample: dict, system_message: str = SYSTEM_MESSAGE) -> list[dict]:
    """The seed's function: a ChartQA row -> [system, user(image + query), assistant(first label)].

    The first label is the training target (ChartQA rows carry one; extra labels only widen what
    the metric accepts).
    """
    label = sample["label"]
    answer = label[0] if isinstance(label, (list, tuple)) else label
    return build_messages(sample["image"], sample["query"], str(answer), system_message)


def template_variables(processor) -> dict:
    """The TEMPLATE_KWARGS the processor's chat template reads: every rendering passes exactly these."""
    template = getattr(processor, "chat_template", None) or ""
    return {name: value for name, value in TEMPLATE_KWARGS.items() if name in template}


def render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (with the assistant's generation prompt when asked)."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **template_variables(processor))


def prompt_and_completion(processor, messages: list[dict], name: str = "the model") -> tuple[str, str]:
    """(prompt, completion) texts of a conversation that ends with the assistant's answer: the prompt is the
    conversation without the answer, rendered with the generation prompt, exactly what the model sees when it
    answers; the completion is the rest of the full rendering, exactly what it must generate then (for
    Qwen3.5's templates that is the answer, after the prompt's empty think block). Training supervises the
    completion, tokenized on its own, so the answer is found from the rendered prompt rather than from a
    token pattern: a leading line break in the answer cannot merge with the prompt's last line break.

    A template that renders the earlier turns differently once the answer is there makes the prompt no
    prefix of the full text: that is an error naming `name`, never a silently wrong mask."""
    prompt = render(processor, prompt_messages(messages), generation_prompt=True)
    full = render(processor, messages)
    if not full.startswith(prompt):
        raise ChartVLMError(f"the chat template of {name} renders the conversation differently once it holds the "
                            "answer, so the answer cannot be located after the generation prompt")
    return prompt, full[len(prompt):]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages a model sees at generation time: everything before the assistant's answer."""
    return [m for m in messages if m["role"] != "assistant"]


def message_image(messages: list[dict]):
    """The image of a formatted sample (one image per ChartQA question)."""
    for message in messages:
        for item in message["content"] if isinstance(message["content"], list) else []:
            if item.get("type") == "image":
                return item["image"]
    return None


def message_answer(messages: list[dict]) -> str | None:
    for message in messages:
        if message["role"] == "assistant":
            return "".join(i.get("text", "") for i in message["content"] if i.get("type") == "text")
    return None


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The strings a tokenizer turns into one control token wherever they appear in a text: its added tokens
    (`<|im_start|>`, `<|image_pad|>`, `<think>`, ...), longest first."""
    return tuple(sorted({token.content for token in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True))


def check_system_message(text: str, where: str, tokens: tuple[str, ...]) -> None:
    """check_user_text for a system prompt, which may name the reasoning tags: REASONING_SYSTEM_MESSAGE asks for
    <think>...</think>, and in Qwen3's vocabularies those are the very tokens a reasoning answer is written with."""
    check_user_text(text, "system message", where, tuple(token for token in tokens if token not in REASONING_TAGS))


def check_user_text(text: str, field: str, where: str, tokens: tuple[str, ...]) -> None:
    """User text (a question, an answer, a system prompt) must reach the model as text. The tokenizer would
    read a control string inside it as the control token itself: `<|im_start|>assistant` in a question makes
    the labels supervise question text, `<|image_pad|>` breaks the image-token count. Such text is refused
    with BadSampleError naming `where` (the validation pass skips or names the row)."""
    found = next((token for token in tokens if token in text), None)
    if found is not None:
        raise BadSampleError(where, f"the {field} contains {found!r}, which the tokenizer reads as a control "
                                    "token rather than text; remove or rewrite it")
