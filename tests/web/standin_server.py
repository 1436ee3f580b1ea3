"""`python -m tests.web.standin_server`: the API as `infra.cli serve` starts it (settings, port
included, from the SDAPI_ environment: tests.conftest.ServerProcess), with its jobs run by the stand-in engine
(tests/engine/standin.py: made-up pixels at once) and model loads recorded but not run (a fuzzed
`owner/repo` would go to the Hugging Face Hub). For tests that drive the whole HTTP surface from
outside, fast: the schemathesis run and the generated client in tests/web/test_fuzz.py."""

from __future__ import annotations

import uvicorn

import infra.runtime
from infra.runtime import Runtime
from infra.settings import Settings
from infra.web.api import create_app
from tests.engine.standin import StandInEngine


def main() -> None:
    infra.runtime.make_engine = lambda settings, weights: StandInEngine()
    settings = Settings()
    runtime = Runtime.local(settings)
    runtime.dispatcher.load = lambda request: None
    uvicorn.run(create_app(runtime), host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()
