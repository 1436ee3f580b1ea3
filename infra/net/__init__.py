"""The way out to the network: `fetcher` (the one SSRF-safe HTTP client: pinned addresses,
private ranges refused, size caps) and `inputs` (image references -> checked images). May import
models and infra.settings only."""
