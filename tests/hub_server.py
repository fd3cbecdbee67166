"""A Hugging Face Hub on 127.0.0.1 for the download tests: the routes and headers huggingface_hub 2.x uses.

* ``GET /api/models/{repo}[/revision/{rev}]`` (with ``?blobs=True``: each file's size, git blob id and LFS sha256)
  and ``GET /api/models/{repo}/tree/{rev}`` (the recursive file listing ``snapshot_download`` reads);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` (the git blob id; for LFS files
  the sha256, also as ``X-Linked-Etag``), ``X-Linked-Size``, ``Content-Length``, and ``Range`` answered with 206;
* the Hub's refusals: 401 with ``X-Error-Code: RepoNotFound`` (a private repo, not logged in), 401 "Invalid
  credentials" (a bad token), 403 ``GatedRepo`` on the files of a gated repo, 404 ``RepoNotFound`` /
  ``RevisionNotFound`` / ``EntryNotFound``.

Plain HTTP only: no ``X-Xet-*`` headers, so huggingface_hub never tries Xet.  LFS files are served in place
(the real Hub redirects them to a CDN; huggingface_hub follows either).  For the tests it counts the body bytes
it serves per file, can stall a file's body after some bytes (until :meth:`release`, or 60 s), throttle, and
serve a corrupted copy.  The server runs in a daemon thread with daemon request threads: :meth:`stop` (the
fixture's teardown) ends it, and it cannot outlive the test process.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
LFS_NAMES = ("tekken.json",)  # the real repo keeps its 15 MB tokenizer in LFS too
STALL_SECONDS = 60.0
BLOCK = 64 * 1024


@dataclass(frozen=True)
class HubFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_hash(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_hash


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    refusal: str | None = None  # "private", "bad-token" or "gated"


class LocalHub:
    """The Hub's state and its HTTP server; use as a context manager, or :meth:`start` / :meth:`stop`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: Counter[str] = Counter()  # body bytes sent, per file name
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.stall: tuple[str, int] | None = None  # (file name, after this many bytes of its body)
        self.bytes_per_second: float | None = None
        self.corrupt: set[str] = set()  # file names served with one byte changed
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.generation = 0
        self._server: ThreadingHTTPServer | None = None

    # -- content ------------------------------------------------------------------------------------------

    def add_commit(self, repo_id: str, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
        """Add a commit of ``files`` (name -> content) to ``repo_id``, pointed at by ``refs``; returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        content = {name: HubFile(data, name.endswith(LFS_SUFFIXES) or name in LFS_NAMES)
                   for name, data in files.items()}
        commit = hashlib.sha1(json.dumps({n: f.etag for n, f in sorted(content.items())}).encode()).hexdigest()
        repo.commits[commit] = content
        repo.refs.update(dict.fromkeys(refs, commit))
        return commit

    def add_folder(self, repo_id: str, folders: list[Path], refs: tuple[str, ...] = ("main",)) -> str:
        files = {p.name: p.read_bytes() for folder in folders for p in sorted(folder.iterdir()) if p.is_file()}
        return self.add_commit(repo_id, files, refs)

    def reset(self) -> None:
        """Forget the counts and test settings (the repos stay)."""
        with self._lock:
            self.served.clear()
            self.requests.clear()
            self.generation += 1  # a response still going to a client killed before now is not counted
        self.stall, self.bytes_per_second, self.corrupt = None, None, set()
        for repo in self.repos.values():
            repo.refusal = None
        self._released.clear()

    def release(self) -> None:
        """Let a stalled response go on (its client may be gone by then)."""
        self._released.set()

    def wait_served(self, name: str, at_least: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.served[name] < at_least:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the hub served {self.served[name]} bytes of {name}, expected {at_least}")
            time.sleep(0.02)

    # -- server -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_INFO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class _RefusalError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(BaseHTTPRequestHandler):
    state: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._handle(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.state._lock:
            self.state.requests.append((self.command, path, self.headers.get("Range")))
        try:
            if match := _INFO.match(path):
                self._json(self._info(match["repo"], match["rev"]), body)
            elif match := _TREE.match(path):
                repo, commit = self._commit(match["repo"], match["rev"])
                files = repo.commits[commit]
                self._json([{"type": "file", "path": name, "size": len(f.data), "oid": f.git_hash,
                             **({"lfs": {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}} if f.lfs else {})}
                            for name, f in sorted(files.items())], body)
            elif match := _RESOLVE.match(path):
                self._file(match["repo"], match["rev"], match["file"], body)
            else:
                raise _RefusalError(404, None, "Not Found")
        except _RefusalError as refusal:
            headers = {"X-Error-Message": refusal.message, **({"X-Error-Code": refusal.code} if refusal.code else {})}
            if refusal.commit:
                headers["X-Repo-Commit"] = refusal.commit
            self._send(refusal.status, json.dumps({"error": refusal.message}).encode(), headers, body)
        except (BrokenPipeError, ConnectionResetError):  # the client was killed mid-response
            self.close_connection = True

    # -- routes -------------------------------------------------------------------------------------------

    def _repo(self, repo_id: str, api: bool) -> Repo:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            raise _RefusalError(404, "RepoNotFound", "Repository not found")
        if repo.refusal == "private":
            raise _RefusalError(401, "RepoNotFound", "Invalid username or password.")
        if repo.refusal == "bad-token":
            raise _RefusalError(401, None, "Invalid credentials in Authorization header")
        if repo.refusal == "gated" and not api:  # a gated repo's page and listing are public, its files not
            raise _RefusalError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                                             "authorized list. Visit its page to ask for access.")
        return repo

    def _commit(self, repo_id: str, rev: str | None, api: bool = True) -> tuple[Repo, str]:
        repo = self._repo(repo_id, api)
        commit = rev if rev in repo.commits else repo.refs.get(rev or "main")
        if commit is None:
            raise _RefusalError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo, commit

    def _info(self, repo_id: str, rev: str | None) -> dict[str, object]:
        repo, commit = self._commit(repo_id, rev)
        siblings = [{"rfilename": name, "size": len(f.data), "blobId": f.git_hash,
                     **({"lfs": {"sha256": f.sha256, "size": len(f.data), "pointerSize": 134}} if f.lfs else {})}
                    for name, f in sorted(repo.commits[commit].items())]
        return {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo.refusal == "gated" else False, "disabled": False, "downloads": 0,
                "likes": 0, "tags": [], "siblings": siblings, "lastModified": "2026-02-04T00:00:00.000Z"}

    def _file(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo, commit = self._commit(repo_id, rev, api=False)
        hub_file = repo.commits[commit].get(name)
        if hub_file is None:
            raise _RefusalError(404, "EntryNotFound", f"{name} does not exist on {rev}", commit)
        data = hub_file.data
        if name in self.state.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hub_file.etag}"', "Accept-Ranges": "bytes"}
        if hub_file.lfs:
            headers.update({"X-Linked-Etag": f'"{hub_file.sha256}"', "X-Linked-Size": str(len(data))})
        start, status = 0, 200
        if (ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))) is not None:
            start, end = int(ranged[1]), int(ranged[2] or len(data) - 1)
            if start >= len(data):
                raise _RefusalError(416, None, "Range Not Satisfiable")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, body, name=name)

    # -- responses ----------------------------------------------------------------------------------------

    def _json(self, value: object, body: bool) -> None:
        self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool, name: str | None = None) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if not body:
            return
        state = self.state
        generation = state.generation
        for offset in range(0, len(data), BLOCK):
            block = data[offset:offset + BLOCK]
            if name is not None and state.stall is not None and state.stall[0] == name:
                room = state.stall[1] - state.served[name]
                if room <= 0:
                    state._released.wait(STALL_SECONDS)
                elif room < len(block):  # send up to the stall point, then wait there
                    self._write(block[:room], name, generation)
                    state._released.wait(STALL_SECONDS)
                    block = block[room:]
            self._write(block, name, generation)
            if state.bytes_per_second:
                time.sleep(len(block) / state.bytes_per_second)

    def _write(self, block: bytes, name: str | None, generation: int) -> None:
        self.wfile.write(block)
        self.wfile.flush()
        if name is not None:
            with self.state._lock:
                if self.state.generation == generation:
                    self.state.served[name] += len(block)
