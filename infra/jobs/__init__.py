"""Jobs from submission to their end: the typed job contract (`params`), the job record (`job`),
where records live (`store`: SQLite, `dict_store`: a modal.Dict), who runs them (`dispatch`:
worker threads and `execute_job`, the one place a job ends; `modal_dispatch`: the GPU class),
webhooks, per-key usage, the cache cleaner and its timer. May import storage, catalog, net,
models and the engine's protocol (never the engine itself, nor torch)."""
