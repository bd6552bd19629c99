"""usae serve (usae.explorer.serve): 127.0.0.1 only, the folder's files only, one-line
errors. Requests go over a real socket to a real server thread."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from usae.errors import UsaeError
from usae.explorer import serve as serve_module
from usae.explorer.serve import HOST, make_server


@pytest.fixture
def site(tmp_path):
    root = tmp_path / "site"
    (root / "data").mkdir(parents=True)
    (root / "index.html").write_text("<html>home</html>")
    (root / "data" / "a.json").write_text('{"a": 1}')
    (tmp_path / "secret.txt").write_text("outside the site")
    return root


@pytest.fixture
def server(site):
    srv = make_server(site, 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(server, path):
    conn = http.client.HTTPConnection(HOST, server.server_address[1], timeout=10)
    conn.request("GET", path)
    res = conn.getresponse()
    body = res.read()
    conn.close()
    return res.status, body


def test_it_listens_on_loopback_only_on_a_free_port(server):
    assert HOST == "127.0.0.1" and server.server_address[0] == "127.0.0.1"
    assert server.server_address[1] > 0


def test_files_of_the_folder_are_served(server):
    assert _get(server, "/") == (200, b"<html>home</html>")
    assert _get(server, "/data/a.json") == (200, b'{"a": 1}')
    assert _get(server, "/data/a.json?v=3#x") == (200, b'{"a": 1}')
    assert _get(server, "/data/%61.json") == (200, b'{"a": 1}')  # percent-decoded


@pytest.mark.parametrize("path", ["/../secret.txt", "/data/../../secret.txt",
                                  "/%2e%2e/secret.txt", "/data/", "/missing.html"])
def test_nothing_outside_the_folder_and_no_listings(server, path):
    status, body = _get(server, path)
    assert status == 404 and b"outside the site" not in body


def test_a_folder_is_refused_with_its_reason(server):
    status, body = _get(server, "/data/")
    assert status == 404 and b"No listing" in body
    conn = http.client.HTTPConnection(HOST, server.server_address[1], timeout=10)
    conn.request("GET", "/data/")
    res = conn.getresponse()
    res.read()
    conn.close()
    assert (res.status, res.reason) == (404, "No listing")  # the status line's reason


def test_a_file_whose_name_starts_like_the_stripped_slash_is_served(site, server):
    (site / "Xray.html").write_text("x-ray")
    assert _get(server, "/Xray.html") == (200, b"x-ray")


def test_a_link_out_of_the_folder_is_not_followed(site, server):
    (site / "out.txt").symlink_to(site.parent / "secret.txt")
    assert _get(server, "/out.txt")[0] == 404


def test_a_folder_without_an_index_or_a_bad_port_is_refused(tmp_path, site):
    with pytest.raises(UsaeError) as info:
        make_server(tmp_path / "empty")
    assert str(info.value) == f"{tmp_path / 'empty'} has no index.html — build it with " \
                              "`usae explore`"
    for port in (-1, 65536):
        with pytest.raises(UsaeError) as info:
            make_server(site, port)
        assert str(info.value) == f"--port must be between 0 and 65535, got {port}"


def test_the_default_port_is_8000_and_65535_is_allowed(site, monkeypatch):
    bound = []

    class Recorder:
        def __init__(self, address, handler):
            bound.append(address)

    monkeypatch.setattr(serve_module.http.server, "ThreadingHTTPServer", Recorder)
    make_server(site)
    make_server(site, 65535)
    assert bound == [(HOST, 8000), (HOST, 65535)]
    seen = []
    monkeypatch.setattr(serve_module, "make_server", lambda d, p: seen.append(p) or
                        (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        serve_module.serve(site)
    assert seen == [8000]


def test_a_port_in_use_is_one_line(site):
    busy = socket.socket()
    busy.bind((HOST, 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(UsaeError) as info:
            make_server(site, port)
        assert str(info.value) == f"cannot listen on {HOST}:{port}: Address already in use"
    finally:
        busy.close()


def test_serve_prints_the_url_and_stops_on_ctrl_c(site, monkeypatch, capsys):
    made = {}

    class FakeServer:
        server_address = (HOST, 4567)

        def serve_forever(self):
            raise KeyboardInterrupt

        def server_close(self):
            made["closed"] = True

    monkeypatch.setattr(serve_module, "make_server", lambda d, p: made.update(args=(d, p)) or
                        FakeServer())
    serve_module.serve(site, 4567)
    assert capsys.readouterr().out == f"serving {site} at http://127.0.0.1:4567/ (Ctrl-C to " \
                                      "stop)\nstopped\n"
    assert made == {"args": (site, 4567), "closed": True}
    # the address reaches a pipe (a script waiting for it) at once, not when the server stops
    printed = []
    monkeypatch.setattr(serve_module, "print", lambda *a, **k: printed.append((a, k)),
                        raising=False)
    serve_module.serve(site, 4567)
    assert printed[0] == ((f"serving {site} at http://127.0.0.1:4567/ (Ctrl-C to stop)",),
                          {"flush": True})


def test_requests_are_logged_at_debug_level(server, caplog):
    with caplog.at_level("DEBUG", logger="usae.explorer.serve"):
        _get(server, "/")
    assert any(m.startswith("serve: ") and "GET / " in m for m in caplog.messages)
