"""The README documents every setting and gives exactly the two fresh-machine commands."""

from __future__ import annotations

import re
from pathlib import Path

from infra.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme():
    documented = set(re.findall(r"`(SDAPI_[A-Z0-9_]+)`", README))
    assert documented == {f"SDAPI_{name.upper()}" for name in Settings.model_fields}


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "scripts/serve.sh" in README
