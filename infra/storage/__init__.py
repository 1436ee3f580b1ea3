"""Where outputs and run-time configuration live: shared pieces (`base`), local files and the
switch to a bucket (`outputs`), S3-compatible buckets (`s3`), the config store (`config_store`:
files or a modal.Dict) and signed links (`links`). May import net and models; never torch."""
