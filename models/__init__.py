"""The wire: loose-typed fields (`fields`), one request model per endpoint (`requests`), response
envelopes (`responses`) and the errors a client can cause (`errors`). Imports nothing of ours."""
