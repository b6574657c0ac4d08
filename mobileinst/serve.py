"""`mobileinst serve DIR`: serve a `mobileinst export --format web` folder the way it runs best.

    mobileinst serve best_web                      # http://127.0.0.1:8000/
    mobileinst serve best_web --host 0.0.0.0       # a phone on the same network: http://LAN-IP:8000/
    server = make_server("best_web", port=0)       # tests: a random free port, serve_forever in a thread

`python -m http.server` serves the folder too, but without the two headers that make a page
cross-origin isolated (`Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Embedder-Policy:
require-corp`), which browsers require before they give a page SharedArrayBuffer, i.e. before
onnxruntime-web can run WASM on more than one thread (https://web.dev/articles/coop-coep); the
page then runs on one thread and says so. This server sends them, and the MIME types the WASM
files need (`application/wasm` for streaming compilation, `text/javascript` for the .mjs modules).
"""
from __future__ import annotations

import functools
import socket
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .errors import MobileInstError

ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin",
                     "Cross-Origin-Embedder-Policy": "require-corp",
                     "Cross-Origin-Resource-Policy": "same-origin"}
MIME = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript",
        ".json": "application/json", ".onnx": "application/octet-stream", ".html": "text/html"}


class IsolatedHandler(SimpleHTTPRequestHandler):
    """Static files with the cross-origin isolation headers, WASM/module MIME types, no caching
    (a re-exported model is picked up on reload) and no per-request log lines."""

    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **MIME}

    def end_headers(self) -> None:
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A threading HTTP server for `folder` (not yet serving); port 0: a free port
    (server.server_address[1]). MobileInstError when the folder is not a web export or the
    address cannot be bound."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MobileInstError(f"{folder}: no such folder (make one with `mobileinst export --format web`)")
    if not (folder / "index.html").is_file():
        raise MobileInstError(f"{folder}: no index.html, not a `mobileinst export --format web` folder")
    if not 0 <= port <= 65535:
        raise MobileInstError(f"--port must be in [0, 65535], got {port}")
    handler = functools.partial(IsolatedHandler, directory=str(folder))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise MobileInstError(f"cannot serve on {host}:{port}: {e.strerror or e} (another --port or "
                              "--host?)") from None


def lan_address() -> str | None:
    """This machine's address on its local network (the route to a private address; no packet
    is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
            return s.getsockname()[0]
        except OSError:
            return None


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `folder` until Ctrl-C, printing the address(es) to open."""
    server = make_server(folder, host, port)
    port = server.server_address[1]
    urls = [f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"]
    if host in ("0.0.0.0", ""):
        lan = lan_address()
        if lan:
            urls.append(f"http://{lan}:{port}/ (other devices on this network)")
    print(f"serving {folder} (cross-origin isolated) at " + ", ".join(urls) + "; Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
