"""Batches for supervised fine-tuning: processor outputs plus labels on the answers only.

Each conversation is split into the prompt the model sees when it answers (rendered with the generation
prompt) and the completion it must then generate (`prompts.prompt_and_completion`); the prompt goes through
the processor with the image, the completion is tokenized on its own and appended. Only the completion up
to and including its `<|im_end|>` is supervised (the model learns to stop there): the system prompt, the
question, the vision tokens and the padding are -100. A ChartQA answer is a few tokens against hundreds of
prompt tokens, so training on the prompt would spend most of the gradient teaching the model to copy it.
Token ids come from the tokenizer, never from literals.
"""

from __future__ import annotations

import functools

import torch

from chartvlm.errors import BadSampleError
from chartvlm.images import model_image
from chartvlm.prompts import END_TOKEN, SYSTEM_MESSAGE, format_data, message_image, prompt_and_completion

IGNORE_INDEX = -100


def collate_fn(examples: list, processor, system_message: str = SYSTEM_MESSAGE) -> dict:
    """The seed's collator. `examples` are formatted samples (message lists from `format_data`) or raw
    ChartQA rows, which are formatted here so the dataset can stay lazy.

    Returns every key the processor produces (input_ids, attention_mask, pixel_values, image_grid_thw,
    mm_token_type_ids, ...) plus `labels`, right-padded. Images go through `chartvlm.images.model_image` (a
    huge one is shrunk right after decoding); an unusable one raises BadSampleError naming its row (training's
    validation pass leaves such rows out beforehand)."""
    names = [example_name(example, i) for i, example in enumerate(examples)]
    conversations = [_conversation(ex, system_message, name) for ex, name in zip(examples, names)]
    images = [model_image(message_image(conv), processor, name) for conv, name in zip(conversations, names)]
    model = getattr(processor.tokenizer, "name_or_path", "") or "this model"
    prompts, completions = zip(*(prompt_and_completion(processor, conv, model) for conv in conversations))
    encoded = processor(text=list(prompts), images=images, padding=True, return_tensors="pt")
    completion_ids = processor.tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return append_completions(dict(encoded), completion_ids, processor.tokenizer, names)


def example_name(example, index: int) -> str:
    """How an example is named in errors: where its row came from (file:line), its row id, or its position."""
    if isinstance(example, dict):
        for key in ("source_location", "row_id"):
            if example.get(key) is not None:
                return str(example[key]) if key == "source_location" else f"row {example[key]}"
    return f"batch item {index}"


def append_completions(encoded: dict, completions: list[list[int]], tokenizer, names: list[str]) -> dict:
    """Processor outputs of the prompts + the completions' ids, right-padded, and the labels: the completion
    through its first end token. Per-token keys other than the ids and the mask (mm_token_type_ids: 0 for
    text) are extended with zeros."""
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    per_token = [key for key, value in encoded.items() if torch.is_tensor(value) and value.shape == ids.shape]
    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    rows = []
    for i, completion in enumerate(completions):
        if end not in completion:
            raise BadSampleError(names[i], f"the rendered answer has no {END_TOKEN}; the chat template is not a "
                                           "Qwen chat template")
        supervised = completion.index(end) + 1
        keep = mask[i].bool()
        tail = torch.tensor(completion, dtype=ids.dtype)
        row = {key: torch.cat([encoded[key][i][keep], torch.zeros_like(tail)]) for key in per_token}
        row["input_ids"] = torch.cat([ids[i][keep], tail])
        row["attention_mask"][-len(tail):] = 1
        labels = torch.full_like(row["input_ids"], IGNORE_INDEX)
        start = int(keep.sum())
        labels[start : start + supervised] = tail[:supervised]
        row["labels"] = labels
        rows.append(row)
    length = max(len(row["input_ids"]) for row in rows)
    pad_values = {"input_ids": tokenizer.pad_token_id, "labels": IGNORE_INDEX}
    batch = {key: value for key, value in encoded.items() if key not in per_token}
    for key in [*per_token, "labels"]:
        batch[key] = torch.stack([torch.nn.functional.pad(row[key], (0, length - len(row[key])),
                                                          value=pad_values.get(key, 0)) for row in rows])
    return {key: batch[key] for key in [*encoded, "labels"]}


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
