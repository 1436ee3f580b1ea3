"""`infra.net.fetcher`: the server fetches public http(s) URLs only (unless allowlisted), pins each
connection to the address it checked, re-checks every redirect and caps what it reads."""

from __future__ import annotations

import http.server
import socket
import threading
from types import SimpleNamespace

import httpx
import pytest

from infra.catalog import loader
from infra.jobs.webhooks import WebhookSender, _Delivery
from infra.net import fetcher
from models.errors import BadInput
from tests.conftest import KEY


class _Handler(http.server.BaseHTTPRequestHandler):
    """/ok: 200 'hello'; /host: echoes the Host header; /big: Content-Length 1000;
    /stream: 1000 bytes without a Content-Length; /redirect?to=URL: 302 to URL; /loop: 302 to itself."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/ok":
            self._send(200, b"hello")
        elif path == "/host":
            self._send(200, self.headers.get("Host", "").encode())
        elif path == "/big":
            self._send(200, b"x" * 1000)
        elif path == "/stream":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"y" * 100)
            self.close_connection = True
        elif path == "/redirect":
            self.send_response(302)
            self.send_header("Location", query.removeprefix("to="))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"no")

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(200, b"ok")

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the fetcher hanging up on a body over its cap is expected here


def _serve():
    """A loopback server; yields its port."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


server = pytest.fixture(scope="module", name="server")(_serve)
other_server = pytest.fixture(scope="module", name="other_server")(_serve)


def get(url: str, allowlist=(), limit: int = 10_000) -> bytes:
    with fetcher.stream("GET", url, allowlist=list(allowlist), timeout=5) as response:
        assert response.status_code == 200, response.status_code
        return b"".join(fetcher.iter_capped(response, limit))


def fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Make getaddrinfo answer `answers[host]` (one address per call, the last one repeated) for the
    given names; other names resolve as usual. Returns the list of names looked up."""
    real = socket.getaddrinfo
    calls: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host in answers:
            calls.append(host)
            queue = answers[host]
            ip = queue.pop(0) if len(queue) > 1 else queue[0]
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return calls


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1/x.png", "127.0.0.1"),
        ("http://[::1]/x.png", "::1"),
        ("http://10.0.0.1/x.png", "10.0.0.1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://192.168.1.1/", "192.168.1.1"),
        ("http://172.16.5.4/", "172.16.5.4"),
        ("http://100.64.0.1/", "100.64.0.1"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1"),
        ("http://[fd00::1]/", "fd00::1"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://0.0.0.0/", "0.0.0.0"),
        ("http://224.0.0.1/", "224.0.0.1"),
        ("https://127.0.0.1:8443/", "127.0.0.1"),
    ],
)
def test_private_addresses_are_refused(url, address):
    with pytest.raises(BadInput) as caught:
        get(url)
    message = str(caught.value)
    assert "private" in message and f"({address})" in message, message
    assert "this server only fetches public URLs" in message


def test_a_name_that_resolves_to_loopback_is_refused():
    with pytest.raises(fetcher.Blocked, match=r"localhost resolves to a private \(loopback\) address"):
        get("http://localhost/x.png")


def test_a_name_resolved_to_a_private_address_is_refused(monkeypatch):
    fake_dns(monkeypatch, {"internal.test": ["10.1.2.3"]})
    with pytest.raises(fetcher.Blocked, match=r"internal.test resolves to a private address \(10.1.2.3\)"):
        get("http://internal.test/")


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://example.com/"])
def test_other_schemes_are_refused(url):
    with pytest.raises(fetcher.Blocked, match="only fetches http and https"):
        get(url)


def test_address_classes():
    for ip in ["127.0.0.1", "10.0.0.1", "169.254.169.254", "100.64.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1",
               "fc00::1", "ff02::1", "::", "240.0.0.1", "198.18.0.1"]:
        assert fetcher.non_public_reason(ip) is not None, ip
    for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"]:
        assert fetcher.non_public_reason(ip) is None, ip


# --------------------------------------------------------------------------- allowlist and redirects


def test_an_allowlisted_loopback_server_is_fetched(server):
    assert get(f"http://127.0.0.1:{server}/ok", allowlist=["127.0.0.1"]) == b"hello"
    assert get(f"http://127.0.0.1:{server}/ok", allowlist=[f"127.0.0.1:{server}"]) == b"hello"
    with pytest.raises(fetcher.Blocked):
        get(f"http://127.0.0.1:{server}/ok", allowlist=["127.0.0.1:1"])


def test_a_redirect_to_the_metadata_address_is_refused(server):
    url = f"http://127.0.0.1:{server}/redirect?to=http://169.254.169.254/latest/meta-data/"
    with pytest.raises(fetcher.Blocked, match=r"\(169.254.169.254\)"):
        get(url, allowlist=["127.0.0.1"])


def test_a_redirect_to_a_port_not_allowlisted_is_refused(server, other_server):
    allow = [f"127.0.0.1:{server}"]
    assert get(f"http://127.0.0.1:{server}/redirect?to=/ok", allowlist=allow) == b"hello"  # same server: fine
    url = f"http://127.0.0.1:{server}/redirect?to=http://127.0.0.1:{other_server}/ok"
    with pytest.raises(fetcher.Blocked, match=r"\(127.0.0.1\)"):
        get(url, allowlist=allow)
    assert get(url, allowlist=allow + [f"127.0.0.1:{other_server}"]) == b"hello"


def test_a_redirect_to_a_name_that_resolves_privately_is_refused(server, monkeypatch):
    fake_dns(monkeypatch, {"rebind.test": ["127.0.0.1"]})
    url = f"http://127.0.0.1:{server}/redirect?to=http://rebind.test:{server}/ok"
    with pytest.raises(fetcher.Blocked, match="rebind.test resolves to a private"):
        get(url, allowlist=["127.0.0.1"])


def test_redirects_are_capped(server):
    with pytest.raises(httpx.TooManyRedirects):
        get(f"http://127.0.0.1:{server}/loop", allowlist=["127.0.0.1"])


def test_redirects_are_not_followed_when_asked(server):
    url = f"http://127.0.0.1:{server}/redirect?to=/ok"
    with fetcher.stream("GET", url, allowlist=["127.0.0.1"], follow_redirects=False) as response:
        assert response.status_code == 302


# --------------------------------------------------------------------------- pinning


def test_the_connection_goes_to_the_address_checked(server, monkeypatch):
    """The host is resolved once per hop; a later, different DNS answer (rebinding) is never used."""
    calls = fake_dns(monkeypatch, {"pinned.test": ["127.0.0.1", "10.255.255.1"]})
    body = get(f"http://pinned.test:{server}/host", allowlist=["pinned.test"])
    assert body == f"pinned.test:{server}".encode()  # the original Host header
    assert calls == ["pinned.test"]


def test_each_redirect_hop_is_resolved_once(server, monkeypatch):
    calls = fake_dns(monkeypatch, {"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]})
    url = f"http://a.test:{server}/redirect?to=http://b.test:{server}/host"
    assert get(url, allowlist=["a.test", "b.test"]) == f"b.test:{server}".encode()
    assert calls == ["a.test", "b.test"]


def test_a_public_answer_is_used_as_is(monkeypatch):
    fake_dns(monkeypatch, {"public.test": ["93.184.216.34"]})
    assert fetcher.resolve("public.test", 443) == "93.184.216.34"


def test_https_keeps_the_name_for_tls(monkeypatch):
    """An https request goes to the IP with the name as SNI (so the certificate is checked against it)."""
    fake_dns(monkeypatch, {"secure.test": ["93.184.216.34"]})
    with httpx.Client() as client:
        request = fetcher._pinned_request(client, "GET", httpx.URL("https://secure.test/x"), [], None, None)
    assert request.url.host == "93.184.216.34"
    assert request.headers["Host"] == "secure.test"
    assert request.extensions["sni_hostname"] == "secure.test"


# --------------------------------------------------------------------------- size cap


def test_a_content_length_over_the_cap_is_refused_before_reading(server):
    with fetcher.stream("GET", f"http://127.0.0.1:{server}/big", allowlist=["127.0.0.1"]) as response:
        with pytest.raises(fetcher.TooLarge) as caught:
            next(fetcher.iter_capped(response, 999))
        assert caught.value.declared == 1000
        assert not response.is_stream_consumed
    assert get(f"http://127.0.0.1:{server}/big", allowlist=["127.0.0.1"], limit=1000) == b"x" * 1000


def test_a_stream_over_the_cap_is_cut(server):
    with pytest.raises(fetcher.TooLarge) as caught:
        get(f"http://127.0.0.1:{server}/stream", allowlist=["127.0.0.1"], limit=500)
    assert caught.value.declared is None
    assert get(f"http://127.0.0.1:{server}/stream", allowlist=["127.0.0.1"], limit=1000) == b"y" * 1000


# --------------------------------------------------------------------------- the callers


def test_model_downloads_are_refused_with_a_load_error(server, tmp_path):
    settings = SimpleNamespace(max_model_bytes=10_000, model_download_timeout=5, fetch_allowlist=[])
    with pytest.raises(loader.LoadError, match=r"download refused: .*private \(loopback\) address \(127.0.0.1\)"):
        loader.download_file(f"http://127.0.0.1:{server}/big", tmp_path, settings)
    settings.fetch_allowlist = ["127.0.0.1"]
    assert loader.download_file(f"http://127.0.0.1:{server}/big", tmp_path, settings).read_bytes() == b"x" * 1000
    settings.max_model_bytes = 999
    with pytest.raises(loader.LoadError, match="the file is 1000 bytes, over this server's limit of 999 bytes"):
        loader.download_file(f"http://127.0.0.1:{server}/big", tmp_path, settings)


def test_a_webhook_to_a_private_address_is_not_sent(server):
    def post(url, allowlist):
        settings = SimpleNamespace(webhook_attempts=3, webhook_backoff=0, webhook_timeout=5, fetch_allowlist=allowlist,
                                   webhook_secret="secret")
        sender = WebhookSender(None, settings)
        return sender._post(_Delivery("evt", url, b"{}", "test", attempts=1))

    outcome = post("http://169.254.169.254/hook", [])
    assert not outcome.delivered and not outcome.retry
    assert outcome.reason.startswith("not sent: ") and "private (link-local) address (169.254.169.254)" in outcome.reason
    outcome = post(f"http://127.0.0.1:{server}/hook", [])
    assert not outcome.delivered and not outcome.retry and "(127.0.0.1)" in outcome.reason
    assert post(f"http://127.0.0.1:{server}/hook", ["127.0.0.1"]).delivered


def test_an_image_url_on_a_private_address_is_a_400(make_client, image_server):
    client = make_client(fetch_allowlist=[])
    body = {"key": KEY, "prompt": "x", "init_image": f"{image_server}/init64.png",
            "mask_image": f"{image_server}/mask64.png", "steps": 2}
    response = client.post("/api/v1/enterprise/inpaint", json=body)
    assert response.status_code == 400, response.text
    message = str(response.json()["message"])
    assert "init_image" in message and "private" in message and "(127.0.0.1)" in message, message
    assert "this server only fetches public URLs" in message

    text = {"key": KEY, "prompt": "x", "width": 64, "height": 64, "steps": 2}
    assert client.post("/api/v1/enterprise/text2img", json=text).json()["status"] == "success"
