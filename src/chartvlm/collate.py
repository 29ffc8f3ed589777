"""Batches for supervised fine-tuning: processor outputs plus labels on the answers only.

Only the assistant's answer and its closing `<|im_end|>` are supervised; the system prompt, the
question, the vision tokens and the padding are -100. A ChartQA answer is a few tokens against
hundreds of prompt tokens, so training on the prompt would spend most of the gradient teaching the
model to copy it. Token ids come from the tokenizer, never from literals.
"""

from __future__ import annotations

import functools

import torch

from chartvlm.errors import BadSampleError
from chartvlm.images import model_image
from chartvlm.prompts import SYSTEM_MESSAGE, format_data, message_image

IGNORE_INDEX = -100


def _answer_markers(tokenizer) -> tuple[tuple[int, ...], int]:
    """Token ids that open an assistant turn, and the id that closes every turn."""
    opener = tuple(tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False))
    closer = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if closer is None or closer == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <|im_end|> token: not a Qwen chat tokenizer")
    return opener, closer


def answer_only_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Labels that keep each assistant turn's tokens up to and including its <|im_end|>."""
    opener, closer = _answer_markers(tokenizer)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    width = len(opener)
    for row, ids in enumerate(input_ids.tolist()):
        i = 0
        while i <= len(ids) - width:
            if tuple(ids[i : i + width]) != opener:
                i += 1
                continue
            start = i + width
            end = start
            while end < len(ids) and ids[end] != closer:
                end += 1
            stop = min(end + 1, len(ids))  # include <|im_end|> so the model learns to stop
            labels[row, start:stop] = input_ids[row, start:stop]
            i = stop
    return labels


def collate_fn(examples: list, processor, system_message: str = SYSTEM_MESSAGE) -> dict:
    """The seed's collator. `examples` are formatted samples (message lists from `format_data`) or raw
    ChartQA rows, which are formatted here so the dataset can stay lazy.

    Returns every key the processor produces (input_ids, attention_mask, pixel_values,
    image_grid_thw, mm_token_type_ids, ...) plus `labels`. Images go through
    `chartvlm.images.model_image` (a huge one is shrunk right after decoding); an unusable one raises
    BadSampleError naming its row (training's validation pass leaves such rows out beforehand).
    """
    names = [f"row {ex['row_id']}" if isinstance(ex, dict) and ex.get("row_id") is not None else f"batch item {i}"
             for i, ex in enumerate(examples)]
    conversations = [_conversation(ex, system_message, name) for ex, name in zip(examples, names)]
    texts = [processor.apply_chat_template(conv, tokenize=False) for conv in conversations]
    images = [model_image(message_image(conv), processor, name) for conv, name in zip(conversations, names)]
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    batch["labels"] = answer_only_labels(batch["input_ids"], processor.tokenizer)
    return dict(batch)


def _conversation(example, system_message: str, name: str) -> list[dict]:
    """Messages of one example; a raw row without a question or an answer raises BadSampleError naming it."""
    if isinstance(example, list):
        return example
    query, label = example.get("query"), example.get("label")
    if not isinstance(query, str) or not query.strip():
        raise BadSampleError(name, f"the question must be a non-empty string, got {query!r}")
    if label is None or (isinstance(label, (list, tuple)) and not label):
        raise BadSampleError(name, "no answer (the label list is empty)")
    return format_data(example, system_message)


def make_collator(processor, system_message: str = SYSTEM_MESSAGE):
    """A one-argument collator for the Trainer's DataLoader."""
    return functools.partial(collate_fn, processor=processor, system_message=system_message)
