"""A tiny stand-in for the Hugging Face Hub, so download tests speak real HTTP without touching the network.

It serves local directories as model repos on 127.0.0.1 and implements only what `snapshot_download` of
huggingface_hub 2.4.0 asks for (point `HF_ENDPOINT` at `server.url`):

    GET  /api/models/{repo_id}/revision/{revision}   repo info: `sha` (the commit) and `siblings`
    GET  /api/models/{repo_id}/tree/{revision}       file listing (`?recursive=true` lists sub-folders too)
    HEAD /{repo_id}/resolve/{revision}/{path}        file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo_id}/resolve/{revision}/{path}        file bytes, honouring `Range: bytes=N-` (206) for resume

Errors carry the `X-Error-Code` header that huggingface_hub turns into its typed exceptions. Xet is never
advertised (no X-Xet-* headers, no `xetHash`), so huggingface_hub uses its plain HTTP download path.

    with HubServer({"meta-llama/Tiny-Vision": repo_dir}, gated={"meta-llama/Gated"}) as server:
        ...  # run a download with HF_ENDPOINT=server.url, then inspect server.requests
"""

import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit

_REPO_ID = r"(?P<repo_id>[^/]+/[^/]+)"
_API_INFO = re.compile(rf"^/api/models/{_REPO_ID}(?:/revision/(?P<revision>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/models/{_REPO_ID}/tree/(?P<revision>[^/]+)(?:/(?P<folder>.+))?$")
_RESOLVE = re.compile(rf"^/{_REPO_ID}/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


@dataclass(frozen=True)
class Request:
    """One request as the server saw it: `path` is URL-decoded without the query string, `range` and
    `authorization` are the headers of those names (None when absent)."""

    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass(frozen=True)
class _Repo:
    """A directory served as a repo at a single commit, named after a hash of its content like a real one."""

    files: dict[str, Path]  # path in repo ("original/params.json") -> file on disk
    sha: str

    @classmethod
    def from_dir(cls, root: Path) -> "_Repo":
        files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        digest = hashlib.sha1()
        for name, path in files.items():
            digest.update(name.encode() + b"\0" + path.read_bytes())
        return cls(files=files, sha=digest.hexdigest())


def _git_blob_id(data: bytes) -> str:
    """The git object id the Hub reports as a file's `oid` and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """A fake Hub on a free port of 127.0.0.1, run in a background thread for the life of a `with` block."""

    def __init__(
        self,
        repos: dict[str, Path],
        *,
        gated: Iterable[str] = (),
        failing: dict[str, int] | None = None,
    ) -> None:
        """`repos` maps repo ids to directories; `gated` repos list their files but refuse to serve them
        (401 without a token, 403 with one, as the Hub does); `failing` repos answer every request with a status."""
        self._repos = {repo_id: _Repo.from_dir(Path(root)) for repo_id, root in repos.items()}
        self._gated = set(gated)
        self._failing = dict(failing or {})
        self._cuts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # A short poll interval makes shutdown() quick, which keeps the tests fast.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def commit(self, repo_id: str) -> str:
        """The commit sha the server reports for `repo_id`, i.e. the snapshot folder name in the HF cache."""
        return self._repos[repo_id].sha

    def downloads(self, repo_id: str) -> list[str]:
        """Paths in `repo_id` whose bytes were requested (GET on /resolve), in order, repeats included."""
        prefix = f"/{repo_id}/resolve/"
        return [
            r.path[len(prefix) :].split("/", 1)[1]  # drop the revision
            for r in self.requests
            if r.method == "GET" and r.path.startswith(prefix)
        ]

    def cut_next_download(self, repo_id: str, path: str, after_bytes: int) -> None:
        """Drop the connection after `after_bytes` of the next full GET of `path`, as a flaky network would."""
        with self._lock:
            self._cuts[(repo_id, path)] = after_bytes

    def _take_cut(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop((repo_id, path), None)

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects

        def do_GET(self) -> None:
            self._dispatch(send_body=True)

        def do_HEAD(self) -> None:
            self._dispatch(send_body=False)

        def log_message(self, format: str, *args: object) -> None:
            """Stay quiet: tests read `hub.requests` instead of stderr."""

        def _dispatch(self, send_body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            hub._record(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization")))
            if match := _API_INFO.match(path):
                self._api(match, send_body, lambda repo: self._repo_info(match["repo_id"], repo))
            elif match := _API_TREE.match(path):
                recursive = parse_qs(url.query).get("recursive", ["False"])[0].lower() == "true"
                self._api(match, send_body, lambda repo: self._tree(repo, match["folder"], recursive))
            elif match := _RESOLVE.match(path):
                self._resolve(match["repo_id"], match["revision"], match["path"], send_body)
            else:
                self._error(404, None, "Not Found", send_body)

        def _find_repo(self, repo_id: str, revision: str | None, send_body: bool) -> _Repo | None:
            """The repo at `revision`, or None after answering the error the Hub would send."""
            if repo_id in hub._failing:
                status = hub._failing[repo_id]
                self._error(status, None, HTTPStatus(status).phrase, send_body)
                return None
            repo = hub._repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found", send_body)
                return None
            if revision not in (None, "main", repo.sha):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, send_body, repo.sha)
                return None
            return repo

        def _api(self, match: re.Match[str], send_body: bool, answer: Callable[[_Repo], object]) -> None:
            # Like the Hub, the API describes gated repos to anyone: only file downloads need access.
            repo = self._find_repo(match["repo_id"], match["revision"], send_body)
            if repo is not None:
                self._send(200, {"Content-Type": "application/json"}, json.dumps(answer(repo)).encode(), send_body)

        @staticmethod
        def _repo_info(repo_id: str, repo: _Repo) -> dict:
            return {
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo_id in hub._gated else False,
                "siblings": [{"rfilename": name} for name in repo.files],
            }

        @staticmethod
        def _tree(repo: _Repo, folder: str | None, recursive: bool) -> list[dict]:
            prefix = f"{folder}/" if folder else ""
            entries: dict[str, dict] = {}
            for name, file in repo.files.items():
                if not name.startswith(prefix):
                    continue
                parts = name[len(prefix) :].split("/")
                for depth in range(1, len(parts)):  # the folders on the way, as the Hub lists them
                    if recursive or depth == 1:
                        folder_path = prefix + "/".join(parts[:depth])
                        folder_entry = {"type": "directory", "oid": "0" * 40, "size": 0, "path": folder_path}
                        entries.setdefault(folder_path, folder_entry)
                if recursive or len(parts) == 1:
                    data = file.read_bytes()
                    entries[name] = {"type": "file", "oid": _git_blob_id(data), "size": len(data), "path": name}
            return list(entries.values())

        def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
            repo = self._find_repo(repo_id, revision, send_body)
            if repo is None:
                return
            if repo_id in hub._gated:
                # The Hub says 401 to anonymous users and 403 to logged-in users who were not granted access.
                if self.headers.get("Authorization"):
                    status = 403
                    message = (
                        f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                        f"Visit https://huggingface.co/{repo_id} to ask for access."
                    )
                else:
                    status = 401
                    message = (
                        f"Access to model {repo_id} is restricted. "
                        "You must have access to it and be authenticated to access it. Please log in."
                    )
                self._error(status, "GatedRepo", message, send_body, repo.sha)
                return
            if path not in repo.files:
                self._error(404, "EntryNotFound", "Entry not found", send_body, repo.sha)
                return
            data = repo.files[path].read_bytes()
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": repo.sha,
                "ETag": f'"{_git_blob_id(data)}"',
                "Accept-Ranges": "bytes",
            }
            status, start, end = 200, 0, len(data)
            if send_body and (wanted := _RANGE.match(self.headers.get("Range", ""))):
                start = int(wanted["start"])
                end = min(int(wanted["end"]) + 1 if wanted["end"] else len(data), len(data))
                if start >= len(data):
                    self._error(416, None, "Range Not Satisfiable", send_body, repo.sha)
                    return
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            body = data[start:end]
            cut = hub._take_cut(repo_id, path) if send_body and status == 200 else None
            if cut is not None:
                # Promise the whole file, send part of it and hang up: the client sees a truncated body.
                self._send(status, headers, body[:cut], send_body, length=len(body))
                self.close_connection = True
                return
            self._send(status, headers, body, send_body)

        def _error(
            self, status: int, code: str | None, message: str, send_body: bool, commit: str | None = None
        ) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code is not None:
                headers["X-Error-Code"] = code
            if commit is not None:
                headers["X-Repo-Commit"] = commit
            self._send(status, headers, json.dumps({"error": message}).encode(), send_body)

        def _send(
            self, status: int, headers: dict[str, str], body: bytes, send_body: bool, length: int | None = None
        ) -> None:
            """Answer with `body`; `length` overrides the announced Content-Length (to fake a cut transfer)."""
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return Handler
