"""What adapts a loaded model per request. For now: clip_skip.

clip_skip is applied by encoding the prompt ourselves rather than through the pipeline's
`clip_skip` argument, which breaks with transformers >= 5.6 (CLIPTextModel lost `.text_model`)
and whose popular class-level shim breaks single-file loading. The wire value follows A1111 and
ModelsLab: 1 = the last layer (no skip), 2 = the penultimate layer, ... 8.
"""

from __future__ import annotations

import torch


def clip_skip_prompt_embeds(pipeline, prompt: str, clip_skip: int) -> torch.Tensor | None:
    """Prompt embeddings taken `clip_skip - 1` layers before the end, or None for clip_skip 1."""
    skip = clip_skip - 1
    if skip <= 0:
        return None
    layers = pipeline.text_encoder.config.num_hidden_layers
    if skip >= layers:
        raise ValueError(f"clip_skip {clip_skip} is too large for this model's {layers}-layer text encoder")
    prompts = pipeline.maybe_convert_prompt([prompt], pipeline.tokenizer)
    ids = pipeline.tokenizer(
        prompts, padding="max_length", max_length=pipeline.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(pipeline.device)
    with torch.no_grad():
        out = pipeline.text_encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-(skip + 1)]
        return pipeline.text_encoder.final_layer_norm(hidden).to(pipeline.unet.dtype)
