"""`planner review --dashboard`: optuna-dashboard serving a stored study on loopback (every trial with the
planner's user attributes: stages, metrics, measurements, failure reasons), until Ctrl-C."""
from __future__ import annotations

import sys
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna

from planner.errors import PlannerError
from planner.storage import open_storage

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080


class _QuietHandler(WSGIRequestHandler):
    """No line per HTTP request: the terminal keeps the one hint line (`-v` shows the requests)."""

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass


def make_dashboard(storage_url: str, study_name: str, host: str, port: int, verbose: bool = False):
    """(server, url of the study's page): the WSGI server bound to host:port (port 0 takes a free one)."""
    try:
        import optuna_dashboard
    except ImportError:
        raise PlannerError("review --dashboard needs optuna-dashboard: pip install 'planner[dashboard]'") from None
    storage = open_storage(storage_url, must_exist=True)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise PlannerError(f"no study '{study_name}' in {storage_url} (it holds: {', '.join(names) or 'none'})") from None
    app = optuna_dashboard.wsgi(storage)
    try:
        server = make_server(host, port, app, handler_class=WSGIRequestHandler if verbose else _QuietHandler)
    except OSError as exc:
        raise PlannerError(f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}") from None
    shown_host = f"[{host}]" if ":" in host else host
    return server, f"http://{shown_host}:{server.server_port}/dashboard/studies/{study_id}"


def serve(storage_url: str, study_name: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          verbose: bool = False, say: Callable[[str], None] = print) -> None:
    server, url = make_dashboard(storage_url, study_name, host, port, verbose)
    say(f"optuna-dashboard: {url} (Ctrl-C stops it)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
