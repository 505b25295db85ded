"""Cassettes never hold secrets: record a real exchange with a key, then read the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import vcr

from anorag_integrations import Router
from anorag_integrations.config import config_from_dict
from anorag_integrations.testing import FaultServer

from .conftest import MODEL, SECRET_HEADERS, USER


def test_no_secret_reaches_a_cassette(tmp_path: Path, servers: dict[str, FaultServer]) -> None:
    key = "sk-cassette-secret-4711"
    route = {"base_url": servers["a"].base_url, "model": MODEL, "api_key": key}
    recorder = vcr.VCR(filter_headers=SECRET_HEADERS, record_mode="all")
    cassette = tmp_path / "secret.yaml"
    with recorder.use_cassette(str(cassette)), Router(config_from_dict({"llm": {"routes": {"a": route}}}, env={})) as r:
        r.chat(USER)
        list(r.stream(USER))
    assert servers["a"].last_authorization == f"Bearer {key}"  # the key was really sent ...
    text = cassette.read_text()
    assert "chat/completions" in text and text.count("- request:") == 2
    assert key not in text and "authorization" not in text.lower()  # ... and never written down


def test_committed_cassettes_hold_no_secret_headers() -> None:
    files = list((Path(__file__).parent.parent / "cassettes").rglob("*.yaml"))
    assert files, "cassettes/ is empty: run `make record`"
    for path in files:
        text = path.read_text().lower()
        assert not any(f"\n      {header}:" in text for header in SECRET_HEADERS), path
        assert "bearer " not in text, path


def test_the_suite_runs_with_the_network_closed(request: pytest.FixtureRequest, record_mode: str) -> None:
    """pytest-socket admits loopback only, so a test that reached the internet would fail, not pass."""
    assert request.config.getoption("allow_hosts") == "127.0.0.1,::1"
    assert record_mode == "none"  # pytest-recording's mode for this run: replay only, never record
