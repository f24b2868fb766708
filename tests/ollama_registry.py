"""A stand-in for Ollama's registry, so pull tests speak real HTTP without touching the network.

It serves an Ollama store written by tests/ollama_store.py on 127.0.0.1, in the registry's URL layout
(server/images.go, pullModelManifest and downloadBlob):

    GET /v2/{namespace}/{model}/manifests/{tag}     the manifest file, or 404 for an unknown model or tag
    GET /v2/{namespace}/{model}/blobs/sha256:{hex}  307 to /cdn/sha256:{hex}, as registry.ollama.ai redirects
    GET /cdn/sha256:{hex}                           the blob's bytes, honouring `Range: bytes=N-` (206)

    with OllamaRegistry(store) as registry:        # LVA_OLLAMA_REGISTRY=registry.url
        registry.cut(digest, after_bytes=1000)     # the next transfer of that blob hangs up after 1000 bytes
        registry.cut(digest, 1000, times=3)        # ... the next three transfers
        registry.cut(digest, 1000, then_down=True) # ... and the registry hangs up on every request after that
        registry.corrupt(digest)                   # that blob is served with one byte changed
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

_MANIFEST = re.compile(r"^/v2/(?P<namespace>[^/]+)/(?P<model>[^/]+)/manifests/(?P<tag>[^/]+)$")
_BLOB = re.compile(r"^/v2/[^/]+/[^/]+/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
_CDN = re.compile(r"^/cdn/(?P<digest>sha256:[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class OllamaRegistry:
    """The registry on a free port of 127.0.0.1, run in a background thread for the life of a `with` block."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.requests: list[Request] = []
        self._cuts: dict[str, list[int]] = {}
        self._corrupt: set[str] = set()
        self._down_after_cut: set[str] = set()
        self.down = False
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="ollama-registry", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def cut(self, digest: str, after_bytes: int, times: int = 1, then_down: bool = False) -> None:
        """Hang up the next `times` transfers of `digest` after `after_bytes` bytes of their body; `then_down`:
        after the last of them, close every connection without an answer, as a registry gone away."""
        with self._lock:
            self._cuts[digest] = [after_bytes] * times
            if then_down:
                self._down_after_cut.add(digest)

    def corrupt(self, digest: str) -> None:
        with self._lock:
            self._corrupt.add(digest)

    def blob_requests(self, digest: str) -> list[Request]:
        return [r for r in self.requests if r.path == f"/cdn/{digest}"]

    def _take_cut(self, digest: str) -> int | None:
        with self._lock:
            cuts = self._cuts.get(digest)
            if not cuts:
                return None
            cut = cuts.pop()
            if not cuts and digest in self._down_after_cut:
                self.down = True
            return cut

    def __enter__(self) -> OllamaRegistry:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def _handler_for(registry: OllamaRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Stay quiet: tests read `registry.requests`."""

        def do_GET(self) -> None:
            with registry._lock:
                registry.requests.append(Request("GET", self.path, self.headers.get("Range")))
            if registry.down:
                self.close_connection = True            # no answer at all
                return
            if match := _MANIFEST.match(self.path):
                path = (registry.store / "manifests" / "registry.ollama.ai" / match["namespace"] / match["model"]
                        / match["tag"])
                if path.is_file():
                    self._send(200, path.read_bytes(), "application/vnd.docker.distribution.manifest.v2+json")
                else:
                    self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}')
            elif match := _BLOB.match(self.path):
                self.send_response(307)
                self.send_header("Location", f"/cdn/{match['digest']}")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif match := _CDN.match(self.path):
                self._blob(match["digest"])
            else:
                self._send(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}')

        def _blob(self, digest: str) -> None:
            path = registry.store / "blobs" / digest.replace(":", "-")
            if not path.is_file():
                self._send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
                return
            data = bytearray(path.read_bytes())
            if digest in registry._corrupt:
                data[len(data) // 2] ^= 0xFF
            start, status, headers = 0, 200, {"Accept-Ranges": "bytes"}
            if wanted := _RANGE.match(self.headers.get("Range", "")):
                start, status = int(wanted["start"]), 206
                if start >= len(data):
                    self._send(416, b"")
                    return
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = bytes(data[start:])
            cut = registry._take_cut(digest)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut is None:
                self.wfile.write(body)
            else:                       # promise the whole body, send part of it and hang up
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler
