"""Weights files in and out of the store's formats: single-file checkpoints (`checkpoints`),
verifying and converting a download (`convert`), motion adapters and upscalers (`motion`,
`upscalers`), and the tiny models built offline (`tiny`). May import the engine package root,
the catalog and torch / diffusers."""
