"""``ringserve dashboards push`` against local HTTP stubs of Grafana's API (127.0.0.1, free
ports): idempotent uploads, and one-line failures for a refused port, a 401 and a 403."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.cli import main
from dashboards.build import DATASOURCE_UID, all_dashboards


class GrafanaStub(ThreadingHTTPServer):
    """Keeps datasources and dashboards by uid, like Grafana; or refuses every call."""

    def __init__(self, refuse_with: int | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.refuse_with = refuse_with
        self.requests: list[tuple[str, str, Any, str]] = []  # method, path, body, auth
        self.datasources: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: GrafanaStub

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body: Any = json.loads(self.rfile.read(length)) if length else None
        stub = self.server
        stub.requests.append((self.command, self.path, body,
                              self.headers.get("Authorization", "")))
        if stub.refuse_with == 401:
            return self._answer(401, {"message": "invalid API key"})
        if stub.refuse_with == 403:
            return self._answer(403, {"message": "You'll need additional permissions"})
        if self.path.startswith("/api/datasources/uid/"):
            uid = self.path.rsplit("/", 1)[1]
            if uid not in stub.datasources:
                return self._answer(404, {"message": "Data source not found"})
            if self.command == "PUT":
                stub.datasources[uid] = body
            return self._answer(200, stub.datasources[uid])
        if self.path == "/api/datasources" and self.command == "POST":
            if body["uid"] in stub.datasources:
                return self._answer(409, {"message": "data source with the same uid exists"})
            stub.datasources[body["uid"]] = body
            return self._answer(200, {"message": "Datasource added", "id": 1})
        if self.path == "/api/dashboards/db" and self.command == "POST":
            uid = body["dashboard"]["uid"]
            if uid in stub.dashboards and not body.get("overwrite"):
                return self._answer(412, {"message": "version-mismatch"})
            stub.dashboards[uid] = body["dashboard"]
            return self._answer(200, {"status": "success", "uid": uid})
        return self._answer(404, {"message": "not found"})

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def stub(request: pytest.FixtureRequest) -> Iterator[GrafanaStub]:
    server = GrafanaStub(getattr(request, "param", None))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def push(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["dashboards", "push", "--url", url, "--token", "secret-token",
                 "--prometheus-url", "http://127.0.0.1:9999"])
    out, err = capsys.readouterr()
    return code, out, err


def test_push_twice_leaves_one_datasource_and_overwrites_dashboards(
        stub: GrafanaStub, capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(2):
        code, out, err = push(stub.url, capsys)
        assert code == 0, err
    assert list(stub.datasources) == [DATASOURCE_UID]
    assert stub.datasources[DATASOURCE_UID]["url"] == "http://127.0.0.1:9999"
    assert stub.datasources[DATASOURCE_UID]["type"] == "prometheus"
    writes = [(m, p) for m, p, _, _ in stub.requests if m in ("POST", "PUT")
              and "datasources" in p]
    assert writes == [("POST", "/api/datasources"),
                      ("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")]  # once per push
    saves = [body for m, p, body, _ in stub.requests if p == "/api/dashboards/db"]
    names = [d.name for d in all_dashboards()]
    assert len(saves) == 2 * len(names)
    assert all(body["overwrite"] is True for body in saves)
    assert sorted(stub.dashboards) == sorted(f"ringserve-{n}" for n in names)
    assert all(auth == "Bearer secret-token" for *_, auth in stub.requests)


@pytest.mark.parametrize("stub,words", [(401, "401"), (403, "403")], indirect=["stub"])
def test_refused_token_is_one_line_and_non_zero(stub: GrafanaStub, words: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = push(stub.url, capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not stub.dashboards and not stub.datasources


def test_refused_connection_is_one_line_and_non_zero(
        capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nobody listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        code, out, err = push(f"http://127.0.0.1:{port}", capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and "cannot reach Grafana" in err, err
