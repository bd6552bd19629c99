"""``usae serve DIR``: serve an explorer folder on 127.0.0.1 only, nothing outside DIR."""

from __future__ import annotations

import functools
import http.server
import logging
import posixpath
import urllib.parse
from pathlib import Path

from usae.errors import UsaeError

log = logging.getLogger(__name__)
HOST = "127.0.0.1"


class ExplorerHandler(http.server.SimpleHTTPRequestHandler):
    """Static files from one folder; anything that resolves outside it is a 404."""

    def translate_path(self, path: str) -> str:
        root = Path(self.directory).resolve()
        clean = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(path).path))
        target = (root / clean.lstrip("/")).resolve()
        if target != root and root not in target.parents:
            return str(root / "__outside__")  # does not exist -> 404
        return str(target)

    def list_directory(self, path):  # noqa: D401 - no directory listings
        self.send_error(404, "No listing")
        return None

    def log_message(self, fmt: str, *args) -> None:
        log.debug("serve: " + fmt, *args)


def make_server(directory: str | Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    directory = Path(directory)
    if not (directory / "index.html").exists():
        raise UsaeError(f"{directory} has no index.html — build it with `usae explore`")
    if not 0 <= int(port) <= 65535:
        raise UsaeError(f"--port must be between 0 and 65535, got {port}")
    handler = functools.partial(ExplorerHandler, directory=str(directory.resolve()))
    try:
        return http.server.ThreadingHTTPServer((HOST, port), handler)
    except OSError as err:
        raise UsaeError(f"cannot listen on {HOST}:{port}: {err.strerror}") from None


def serve(directory: str | Path, port: int = 8000) -> None:
    server = make_server(directory, port)
    url = f"http://{HOST}:{server.server_address[1]}/"
    print(f"serving {directory} at {url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
