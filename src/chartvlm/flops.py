"""Model FLOPs of every Qwen family, for `chartvlm bench`'s achieved TFLOP/s and MFU.

2 FLOPs per multiply-add, read from a model's config (so every family in chartvlm.families is counted from its
own numbers): every linear layer and convolution, and attention's two matmuls (4 d per pair of positions that
attend to each other). Norms, activations, rotary embeddings, softmax and DeepStack's additions are left out
(under 1%). tests/test_bench.py checks the counts against torch's FlopCounterMode on every family's tiny preset.

Qwen3.5's linear-attention layers (Gated DeltaNet) are counted in their recurrent form: per token and value
head, reading, updating and querying a key x value state (6 dk dv); their chunked kernels do somewhat more.
"""

from __future__ import annotations


def vision(vc, grid: tuple[int, int, int]) -> float:
    """Forward FLOPs of the vision tower for one image of `grid` = (t, h, w) patches: patch embedding, per block
    the fused qkv and output projections, the MLP (gated in Qwen2.5-VL) and attention (within windows of
    window_size pixels, or the whole image in the full-attention blocks and in the families without windows),
    then the merger (an MLP on groups of merge^2 patches into the language model's width) and Qwen3-VL's
    DeepStack mergers (one more per deepstack layer)."""
    t, h, w = grid
    n = t * h * w
    d = getattr(vc, "embed_dim", None) or vc.hidden_size
    merge = vc.spatial_merge_size
    flops = 2 * n * (vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2) * d
    if getattr(vc, "mlp_ratio", None):  # Qwen2-VL: fc1, fc2
        mlp = 2 * d * int(d * vc.mlp_ratio)
    elif getattr(vc, "fullatt_block_indexes", None) is not None:  # Qwen2.5-VL: gate, up, down
        mlp = 3 * d * vc.intermediate_size
    else:  # Qwen3-VL, Qwen3.5: linear_fc1, linear_fc2
        mlp = 2 * d * vc.intermediate_size
    window_pairs = n * n
    if getattr(vc, "window_size", None) and getattr(vc, "fullatt_block_indexes", None) is not None:
        # Windows tile the merged grid in squares of `unit` merged tokens; those on the right and bottom edges
        # are cut short.
        unit = vc.window_size // (vc.patch_size * merge)

        def spans(length: int) -> list[int]:
            return [unit] * (length // unit) + ([length % unit] if length % unit else [])

        window_pairs = t * sum((rows * cols * merge * merge) ** 2
                               for rows in spans(h // merge) for cols in spans(w // merge))
    full_blocks = set(getattr(vc, "fullatt_block_indexes", None) or range(vc.depth))
    for block in range(vc.depth):
        pairs = n * n if block in full_blocks else window_pairs
        flops += 2 * n * (4 * d * d + mlp) + 4 * pairs * d
    merged, width = n // merge ** 2, d * merge ** 2
    out = getattr(vc, "out_hidden_size", None) or vc.hidden_size  # Qwen2-VL names the merger's output hidden_size
    mergers = 1 + len(getattr(vc, "deepstack_visual_indexes", None) or [])
    flops += mergers * 2 * merged * width * (width + out)
    return float(flops)


def text(tc, length: int, head_positions: int, context: int = 0) -> float:
    """Forward FLOPs of the language model over `length` new tokens that follow `context` cached ones, with the
    LM head on `head_positions` of them. Full-attention layers: q/k/v/o projections (grouped-query k and v;
    Qwen3.5's query projection also yields its output gate) and causal attention; Gated DeltaNet layers: their
    projections and recurrent state; then the MLP (dense, or the routed experts, shared expert and router of
    the MoE families) and the head."""
    h = tc.hidden_size
    head_dim = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
    q = tc.num_attention_heads * head_dim
    kv = tc.num_key_value_heads * head_dim
    gated = 2 if tc.model_type.startswith("qwen3_5") else 1  # Qwen3.5's query projection also yields a gate
    pairs = length * context + length * (length + 1) / 2
    full = 2 * length * (h * q * gated + 2 * h * kv + q * h) + 4 * pairs * q
    layer_types = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
    linear = 0.0
    if "linear_attention" in layer_types:
        nk, dk = tc.linear_num_key_heads, tc.linear_key_head_dim
        nv, dv = tc.linear_num_value_heads, tc.linear_value_head_dim
        projections = h * (2 * nk * dk + nv * dv) + h * nv * dv + 2 * h * nv + nv * dv * h
        linear = 2 * length * projections + 6 * length * nv * dk * dv
    experts = getattr(tc, "num_experts", None)
    if experts:
        mlp = 2 * length * (tc.num_experts_per_tok * 3 * h * tc.moe_intermediate_size + h * experts)
        shared = getattr(tc, "shared_expert_intermediate_size", None)
        if shared:
            mlp += 2 * length * (3 * h * shared + h)
    else:
        mlp = 2 * length * 3 * h * tc.intermediate_size
    layers = sum(full if kind == "full_attention" else linear for kind in layer_types)
    return float(layers + tc.num_hidden_layers * mlp + 2 * head_positions * h * tc.vocab_size)


def train_step(config, grids: list[tuple], lengths: list[int], supervised: list[int], full_tuning: bool = False,
               recompute: bool = False) -> float:
    """FLOPs of one training step on a batch (real tokens only, padding not counted).

    Forward: vision tower + language model with the LM head on the supervised positions only (the useful work;
    the seed's full-vocabulary head is waste and counts as such). Backward: the vision tower is frozen and runs
    no backward; the language model's backward costs 1x its forward when its weights are frozen (LoRA: input
    gradients only, the adapters are negligible) and 2x with full tuning. recompute=True adds the forward that
    gradient checkpointing repeats (hardware FLOPs; the MFU we report is without it)."""
    vision_flops = sum(vision(config.vision_config, g) for g in grids)
    text_flops = sum(text(config.text_config, n, s) for n, s in zip(lengths, supervised))
    backward = 2.0 if full_tuning else 1.0
    return vision_flops + text_flops * (1 + backward + (1 if recompute else 0))


def generate(config, grid: tuple, prompt_length: int, new_tokens: int) -> float:
    """FLOPs of answering one question: vision tower, prefill (head on the last position), then one forward per
    generated token over the growing cache."""
    flops = vision(config.vision_config, grid) + text(config.text_config, prompt_length, 1)
    for k in range(max(new_tokens - 1, 0)):
        flops += text(config.text_config, 1, 1, context=prompt_length + k)
    return flops
