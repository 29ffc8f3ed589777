"""Padding-free packed training: the samples of a step in one row, each keeping its own positions and attention.

Padded batches waste compute on padding (a quarter of the tokens on ChartQA-like charts at batch 8). With
`packing: true`, the training samples are grouped into bins of at most `max_length` tokens (first-fit
decreasing, by the exact lengths computed from image headers); a step takes `per_device_train_batch_size` bins
and lays all their samples end to end in a single row: no padding at all, and an image is never split.

Each sample keeps what it would have alone:
- its M-RoPE positions, from the model's own rope-index function run on the sample by itself, and text
  positions that restart at 0. transformers' Qwen-VL text models take position_ids of shape [4, batch, length]
  (text row first) with no attention mask and then keep packed samples apart;
- attention that never crosses samples and does no work across them: the sample boundaries travel as
  `cu_seq_lens_q/k` (flash-attention's variable-length form, which transformers passes on to the attention
  function); on GPU flash_attention_2 uses them directly, elsewhere `segment_attention` runs causal attention on
  each sample in turn (a dense masked attention over the whole row would do quadratic work on masked blocks);
- the same supervised tokens: the loss is summed over them and divided by their count, as unpacked.

Qwen3.5's linear-attention layers keep packed samples apart only with the flash-linear-attention and
causal-conv1d kernels (GPU): their PyTorch fallbacks would carry state from one sample into the next, so packing
is refused there without them.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging

import torch

from chartvlm.errors import ChartVLMError

logger = logging.getLogger(__name__)

SEGMENT_ATTENTION = "chartvlm_segments"
BINS_COLUMN = "packed_indices"


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins whose lengths sum to at most `capacity`: longest first, each into the first bin
    with room. Deterministic (ties keep index order); each bin lists its indices in dataset order."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[index] > capacity:
            raise ChartVLMError(f"sample {index} has {lengths[index]} tokens, more than max_length={capacity}")
        target = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
        if target is None:
            bins.append([index])
            room.append(capacity - lengths[index])
        else:
            bins[target].append(index)
            room[target] -= lengths[index]
    return [sorted(found) for found in bins]


def packed_dataset(dataset, lengths: list[int], capacity: int, length_column: str = "length"):
    """The training set as bins (`first_fit_decreasing`): a `datasets.Dataset` with the indices of each bin's
    samples and its token count, so the Trainer's samplers (shuffling, grouping, sharding across ranks, skipping
    on resume) work on bins as they work on samples."""
    import datasets

    bins = first_fit_decreasing(lengths, capacity)
    filled = sum(lengths) / (len(bins) * capacity)
    logger.info("packing: %d samples into %d rows of at most %d tokens (%.0f%% filled)", len(lengths), len(bins),
                capacity, 100 * filled)
    return datasets.Dataset.from_dict({BINS_COLUMN: bins, length_column: [sum(lengths[i] for i in b) for b in bins]})


class PackedCollator:
    """Collates bins of `source` (items of `packed_dataset`) into one padding-free row; other items (the
    eval-loss split, which stays unpacked) go to `collate` as they are."""

    def __init__(self, collate, source, rope_index):
        self.collate = collate
        self.source = source
        self.rope_index = rope_index

    def __call__(self, items: list) -> dict:
        if not (items and isinstance(items[0], dict) and BINS_COLUMN in items[0]):
            return self.collate(items)
        rows = [self.source[index] for item in items for index in item[BINS_COLUMN]]
        return pack_batch(self.collate(rows), self.rope_index)


def pack_batch(batch: dict, rope_index) -> dict:
    """A padded batch (collate.collate_fn's) as one row: each sample's tokens without padding, end to end, with
    position_ids [4, 1, total] (text positions restarting at 0, then the sample's own M-RoPE rows), no attention
    mask, and the sample boundaries as cu_seq_lens_q/k and max_length_q/k (plus seq_idx, the sample of each
    token, for Qwen3.5's convolutions)."""
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(dim=1)
    rope, _ = rope_index(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                         image_grid_thw=batch.get("image_grid_thw"), attention_mask=batch["attention_mask"])
    per_token = [key for key, value in batch.items() if torch.is_tensor(value) and value.shape == mask.shape]
    packed = {key: value for key, value in batch.items() if key not in per_token}
    for key in per_token:
        if key != "attention_mask":
            packed[key] = batch[key][mask].unsqueeze(0)
    text = torch.cat([torch.arange(int(n)) for n in lengths])
    packed["position_ids"] = torch.cat([text.view(1, 1, -1), rope[:, mask].unsqueeze(1)], dim=0)
    bounds = torch.tensor([0, *itertools.accumulate(int(n) for n in lengths)], dtype=torch.int32)
    packed["cu_seq_lens_q"] = packed["cu_seq_lens_k"] = bounds
    packed["max_length_q"] = packed["max_length_k"] = int(lengths.max())
    packed["seq_idx"] = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths).view(1, -1)
    return packed


def segment_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Attention for packed rows off flash-attention: causal attention within each sample (cu_seq_lens_q), one
    call per sample, so no work is spent on pairs that cross samples. Unpacked calls (padded batches, generation,
    the vision tower) are plain sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("cu_seq_lens_k", None)
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    if cu_seq_lens_q is None or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu_seq_lens_q.tolist()
    pieces = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                     None, dropout=dropout, scaling=scaling, is_causal=True)[0]
              for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces, dim=1), None


def register_segment_attention() -> None:
    """Make `SEGMENT_ATTENTION` an attention implementation transformers knows (with sdpa's masks for the unpacked
    calls that carry one)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)


def prepare_model(model, family, attn_implementation: str) -> None:
    """Check that `model` can train on packed rows and give its language model an attention that keeps samples
    apart without wasted work: flash_attention_2 as asked, else `segment_attention`."""
    if family.linear_attention and not linear_attention_kernels(model):
        raise ChartVLMError(f"packing {family.title}: its linear-attention layers keep packed samples apart only with "
                            "the flash-linear-attention and causal-conv1d kernels on a GPU (their PyTorch fallbacks "
                            "would carry one sample's state into the next); set packing: false")
    if "flash" not in attn_implementation:
        register_segment_attention()
        model.set_attn_implementation({"text_config": SEGMENT_ATTENTION})
        logger.info("packing: attention runs per sample (%s) in the language model", SEGMENT_ATTENTION)


def linear_attention_kernels(model) -> bool:
    on_gpu = next(model.parameters()).device.type == "cuda"
    return on_gpu and all(importlib.util.find_spec(name) is not None for name in ("fla", "causal_conv1d"))


def rope_index_of(model):
    """The model's own M-RoPE position function (a pure function of the inputs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.get_rope_index
