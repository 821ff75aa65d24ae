"""`hpsearch dashboard`: optuna-dashboard on a study storage, with the study's artifact store.

The server binds 127.0.0.1 unless told otherwise (the dashboard can edit and delete studies, so
it is not put on the network by default). The artifact store is the file-system store where
`hpsearch run` keeps the best trials' checkpoints and `hpsearch report` stores the one it
retrains (`artifacts/` beside a SQLite or journal file), so the dashboard lists and serves them.
"""

from __future__ import annotations

import ipaddress

import socket
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .errors import HPSearchError, Interrupted
from .study import artifact_dir, dashboard_app, redact


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def make_dashboard_server(storage: str, host: str = "127.0.0.1", port: int = 8080,
                          artifacts: str | Path | None = None) -> tuple[WSGIServer, Path]:
    """A ready (not yet serving) optuna-dashboard server and its artifact directory."""
    if not 0 <= port <= 65535:
        raise HPSearchError(f"--port must be between 0 and 65535, got {port}")
    store_dir = Path(artifacts) if artifacts is not None else artifact_dir(storage)
    app = dashboard_app(storage, store_dir)  # imports optuna-dashboard: only `hpsearch.study` talks to Optuna
    server_class = _ThreadedServer
    if ":" in host:  # an IPv6 address such as ::1
        server_class = type("_ThreadedServer6", (_ThreadedServer,), {"address_family": socket.AF_INET6})
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise HPSearchError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from None
    return server, store_dir


def is_loopback(host: str) -> bool:
    """Whether an address to bind reaches this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to a public interface
        return False


def serve_dashboard(storage: str, host: str = "127.0.0.1", port: int = 8080, artifacts: str | Path | None = None,
                    announce: Callable[[str], None] = print, warn: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C."""
    server, store_dir = make_dashboard_server(storage, host, port, artifacts)
    if not is_loopback(host):  # optuna-dashboard has no login: anyone who reaches it can read and edit
        warn(f"warning: --host {host} exposes the study and its checkpoints to the network with no password: anyone "
             f"who can reach this machine on port {server.server_port} can read and change them; use --host 127.0.0.1 "
             f"and an SSH tunnel to share it safely")
    shown_host = f"[{host}]" if ":" in host else host
    announce(f"optuna-dashboard for {redact(storage)} on http://{shown_host}:{server.server_port}/ "
             f"(artifacts in {store_dir}); Ctrl-C to stop")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C, or SIGTERM through the CLI's handler
        announce("dashboard stopped")
    finally:
        server.server_close()
