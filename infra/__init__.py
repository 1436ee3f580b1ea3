"""Everything below the wire models: the I/O, the engine and the composition root.

Layers, each importing only those below it (never up, never a sibling that imports it back):

    cli, modal_worker      entry points (the local server, the Modal GPU worker's body)
    runtime                the composition root: Runtime.local() / Runtime.modal()
    web/                   the HTTP layer (routes, auth, envelopes, OpenAPI); imports handlers
    jobs/                  the job contract, job stores, dispatch, webhooks, usage, cleaning
    engine/                the only torch / diffusers code, written against jobs' params
    storage/, catalog/     outputs (local files, S3) and run-time config; the weights store
    net/                   the one SSRF-safe way out (fetcher) and image inputs
    settings, limits, media, safety    leaves: every knob, per-key limits, video encoding, NSFW

`handlers/` (above jobs, below web) and `models/` (the bottom) live beside this package.
"""
