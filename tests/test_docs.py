"""The README documents every setting and gives exactly the two fresh-machine commands."""

from __future__ import annotations

import re
from pathlib import Path

from infra.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme():
    documented = set(re.findall(r"`(SDAPI_[A-Z0-9_]+)`", README))
    deploy_time = {name for name in documented if name.startswith("SDAPI_MODAL_")}  # read by modal_app.py
    fields = {f"SDAPI_{name.upper()}" for name in Settings.model_fields}
    assert fields <= documented and documented - deploy_time == fields - deploy_time
    # a setting the containers read about the deployment is baked by modal_app (every container sees the same)
    assert {name for name in fields if name.startswith("SDAPI_MODAL_")} <= deploy_time
    modal_app = (Path(__file__).resolve().parent.parent / "modal_app.py").read_text()
    assert deploy_time == set(re.findall(r'"(SDAPI_MODAL_[A-Z0-9_]+)"', modal_app))


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "scripts/serve.sh" in README


def test_the_readme_webhook_check_verifies_our_signatures():
    """The receiver snippet in the README accepts what the server signs, and nothing else."""
    import time

    from infra.jobs.webhooks import sign, webhook_secret

    section = README[README.index("## Webhooks"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - our own README
    body, timestamp = b'{"status": "success", "id": 1}', str(int(time.time()))
    secret = webhook_secret(Settings(api_keys=["customer-key"]))
    import hashlib
    import hmac

    assert secret == hmac.new(b"customer-key", b"sdapi-webhooks", hashlib.sha256).hexdigest()  # as documented
    assert namespace["verify"](secret, timestamp, body, sign(secret, timestamp, body))
    assert not namespace["verify"](secret, timestamp, body + b" ", sign(secret, timestamp, body))
    assert not namespace["verify"](secret, str(int(time.time()) - 3600), body, sign(secret, int(time.time()) - 3600, body))
