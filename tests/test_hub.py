"""The Hub asked once and quickly (pipeline/hub.py): unreachable, no such model, bad token, bad id,
each one line in seconds, against a closed port and a local stand-in for the Hub's API."""

import http.server
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from pipeline import hub


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The Hub reachable as far as settings go (tests run with HF_HUB_OFFLINE=1), and no stored token."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))


@pytest.fixture
def fake_hub(monkeypatch):
    """A local server answering like the Hub: model 'org/there' exists, token 'good' is accepted."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            token_ok = self.headers.get("Authorization") == "Bearer good"
            status = {"/api/models/org/there": 200, "/api/whoami-v2": 200 if token_ok else 401}.get(self.path, 404)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()


def test_an_unreachable_hub_is_one_quick_error(online, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_TOKEN", "good")
    start = time.monotonic()
    with pytest.raises(hub.HubError, match=r"Hugging Face Hub \(http://127.0.0.1:\d+\) cannot be reached"):
        hub.check_model("org/there")
    with pytest.raises(hub.HubError, match="cannot be reached"):
        hub.check_push("org/mine")
    assert time.monotonic() - start < 30  # no retries with backoff (minutes)


def test_a_missing_model_and_a_refused_token_are_told_apart(online, fake_hub, monkeypatch):
    hub.check_model("org/there")
    with pytest.raises(hub.HubError, match=r"no model 'org/gone' this token may read \(HTTP 404\).*hf auth login"):
        hub.check_model("org/gone")
    monkeypatch.setenv("HF_TOKEN", "bad")
    with pytest.raises(hub.HubError, match=r"refuses this token \(HTTP 401\)"):
        hub.check_push("org/mine")
    monkeypatch.setenv("HF_TOKEN", "good")
    hub.check_push("org/mine")


def test_push_needs_an_id_a_token_and_no_offline_mode(online, fake_hub, monkeypatch):
    for bad in (None, "just-a-name", "org/bad name"):
        with pytest.raises(hub.HubError, match="hub_model_id must be 'user-or-org/name'"):
            hub.check_push(bad)
    with pytest.raises(hub.HubError, match="no Hugging Face token.*hf auth login.*HF_TOKEN"):
        hub.check_push("org/mine")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set"):
        hub.check_push("org/mine")
