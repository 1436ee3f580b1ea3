"""Pipelines of diffusers' community collection (`examples/community/`), which the diffusers
package does not ship, written here as packaged-style pipelines: each a subclass of the packaged
pipeline it extends, so `from_pipe` builds it on a loaded model's components (the model cache's
variants) and the engine calls it like any other.

- `magic_mix.MagicMixPipeline`: MagicMix (Liew et al., 2022), image_editing/magic_mix.
"""
