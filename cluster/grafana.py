"""``ringserve dashboards push``: upload the Prometheus datasource and the dashboards to Grafana.

Idempotent: the datasource has a fixed uid (created when missing, updated otherwise, so
pushing twice leaves one copy) and each dashboard is saved with ``overwrite`` under its fixed
uid. A refused connection, a 401 or a 403 is a :class:`PushError` with a one-line message.
Uses grafana-client (the ``monitoring`` extra).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
DATASOURCE_NAME = "ringserve Prometheus"
TIMEOUT_S = 10.0


class PushError(Exception):
    """Grafana could not be reached or refused the push (message: one line)."""


@dataclass(frozen=True)
class PushResult:
    datasource: str  # "created" or "updated"
    dashboards: tuple[str, ...]  # uids saved


def datasource_body(prometheus_url: str, uid: str) -> dict[str, Any]:
    """The Prometheus datasource the dashboards refer to by ``uid``."""
    return {"uid": uid, "name": DATASOURCE_NAME, "type": "prometheus", "access": "proxy",
            "url": prometheus_url, "isDefault": False, "jsonData": {"timeInterval": "10s"}}


def push(url: str, token: str | None, dashboard_files: list[Path],
         prometheus_url: str = DEFAULT_PROMETHEUS_URL) -> PushResult:
    """Push the datasource and every dashboard JSON file to the Grafana at ``url``."""
    try:
        from grafana_client import GrafanaApi
        from grafana_client.client import GrafanaClientError, GrafanaException
    except ImportError:
        raise PushError("grafana-client is not installed: pip install "
                        "'ringserve[monitoring]' (or grafana-client)") from None

    from dashboards.build import DATASOURCE_UID

    try:
        api = GrafanaApi.from_url(url, credential=token or None, timeout=TIMEOUT_S)
    except (ValueError, TypeError) as exc:
        raise PushError(f"bad Grafana URL {url!r}: {exc}") from None
    body = datasource_body(prometheus_url, DATASOURCE_UID)
    try:
        try:
            api.datasource.get_datasource_by_uid(DATASOURCE_UID)
            exists = True
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise
            exists = False
        if exists:
            api.datasource.update_datasource_by_uid(DATASOURCE_UID, body)
        else:
            api.datasource.create_datasource(body)
        saved = []
        for path in dashboard_files:
            dashboard = json.loads(path.read_text())
            dashboard.pop("id", None)  # matched by uid; Grafana assigns ids
            api.dashboard.update_dashboard({"dashboard": dashboard, "overwrite": True,
                                            "message": "ringserve dashboards push"})
            saved.append(str(dashboard["uid"]))
    except GrafanaException as exc:
        raise PushError(_refusal(url, exc.status_code, exc.message)) from None
    except OSError as exc:  # niquests' ConnectionError and timeouts are OSErrors
        raise PushError(f"cannot reach Grafana at {url}: {_reason(exc)}") from None
    return PushResult("updated" if exists else "created", tuple(saved))


def _refusal(url: str, status: int | None, message: object) -> str:
    if status == 401:
        return f"Grafana at {url} refused the token (401 Unauthorized)"
    if status == 403:
        return f"Grafana at {url} says the token may not do this (403 Forbidden)"
    detail = " ".join(str(message).split())[:200]
    return f"Grafana at {url} answered {status}: {detail}"


def _reason(exc: BaseException) -> str:
    """The innermost cause of a connection failure, in one line."""
    while exc.__context__ is not None and exc.__context__ is not exc:
        exc = exc.__context__
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]
