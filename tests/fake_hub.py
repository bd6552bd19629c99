"""A Hugging Face Hub stand-in on 127.0.0.1 for tests: serves one repository's files through
the endpoints ``huggingface_hub.snapshot_download`` calls (repo info, tree, resolve), so the
real client lays out its real cache. Run as a script: ``fake_hub.py FOLDER REPO_ID`` prints
the endpoint and serves until killed."""

from __future__ import annotations

import hashlib
import http.server
import json
import sys
import threading
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"


def make_handler(files: dict[str, bytes], repo_id: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, obj) -> None:
            self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

        def _resolve(self, head: bool) -> None:
            name = self.path.split("/resolve/", 1)[1].split("/", 1)[1].split("?")[0]
            data = files.get(name)
            if data is None:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
            self._send(200, data, {"X-Repo-Commit": SHA,
                                   "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, head)

        def do_HEAD(self) -> None:  # noqa: N802
            self._resolve(head=True)

        def do_GET(self) -> None:  # noqa: N802
            if f"/api/models/{repo_id}/tree/" in self.path:
                self._json([{"type": "file", "path": f, "size": len(d),
                             "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()])
            elif self.path.startswith(f"/api/models/{repo_id}/revision/"):
                self._json({"id": repo_id, "sha": SHA,
                            "siblings": [{"rfilename": f} for f in files]})
            elif f"/{repo_id}/resolve/" in self.path:
                self._resolve(head=False)
            else:
                self._send(404, b"", {"X-Error-Code": "RepoNotFound"})

    return Handler


def serve(folder: Path, repo_id: str) -> http.server.ThreadingHTTPServer:
    files = {p.relative_to(folder).as_posix(): p.read_bytes()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(files, repo_id))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    srv = serve(Path(sys.argv[1]), sys.argv[2])
    print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)
    threading.Event().wait()
