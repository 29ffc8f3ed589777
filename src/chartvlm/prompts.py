"""The one place that turns a ChartQA row into chat messages.

Training, evaluation and inference all call `format_data` (or `build_messages`), so the system
prompt, the message layout and the image are identical everywhere: prompt drift between training
and evaluation is a classic silent accuracy loss.
"""

from __future__ import annotations

from chartvlm.errors import BadSampleError

SYSTEM_MESSAGE = (
    "You answer questions about chart images. Read the chart carefully (axes, legend, labels and "
    "values) and reply with only the answer: a single word, a number or a short phrase, with no "
    "explanation. Write numbers without thousands separators or units."
)


def build_messages(image, query: str, answer: str | None = None, system_message: str = SYSTEM_MESSAGE) -> list[dict]:
    """system / user(image + question) [/ assistant(answer)] messages in the chat-template format."""
    messages = [
        {"role": "system", "content": [{"type": "text", "text": system_message}]},
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": query}]},
    ]
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


def check_user_text(text: str, field: str, where: str, tokens: tuple[str, ...]) -> None:
    """User text (a question, an answer, a system prompt) must reach the model as text. The tokenizer would
    read a control string inside it as the control token itself: `<|im_start|>assistant` in a question makes
    the labels supervise question text, `<|image_pad|>` breaks the image-token count. Such text is refused
    with BadSampleError naming `where` (the validation pass skips or names the row)."""
    found = next((token for token in tokens if token in text), None)
    if found is not None:
        raise BadSampleError(where, f"the {field} contains {found!r}, which the tokenizer reads as a control "
                                    "token rather than text; remove or rewrite it")
