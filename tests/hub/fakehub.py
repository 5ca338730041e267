"""A loopback stand-in for the Hugging Face Hub: the parts of its HTTP API huggingface_hub uses.

Reads: repo info (with siblings and commit sha), the recursive tree listing, file resolution (HEAD and
GET ``/{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``,
``Content-Length``). Writes: repo creation, branches, README metadata validation, preupload, the LFS
batch API (basic transfer, for ``.safetensors`` with ``HF_HUB_DISABLE_XET=1``) and the ndjson commit.
Errors as the Hub sends them: 404/401 ``RepoNotFound`` (missing; private without a token), 403
``GatedRepo``, 401 bad credentials. Every request is logged. The server stops itself after ``lifetime``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

GOOD_TOKEN = "hf_loopback_good_token"
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".pt")
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], branch: str = "main", message: str = "") -> str:
        n = len(self.commits)
        sha = hashlib.sha1(f"{self.repo_id}:{n}:{sorted(files)}:{message}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.messages[sha] = message
        self.branches[branch] = sha
        return sha

    def at(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.branches.get(revision, revision)
        return (sha, self.commits[sha]) if sha in self.commits else None


class FakeHub:
    """State plus a ThreadingHTTPServer on 127.0.0.1 (random port)."""

    def __init__(self, lifetime: float = 300.0) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.log: list[tuple[str, str]] = []  # (method, path with query)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def start(self) -> FakeHub:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():  # shutdown() would wait forever for a loop that never ran
            self.server.shutdown()
        self.server.server_close()

    # -- fixtures' helpers ---------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", **kw: Any) -> Repo:
        repo = Repo(repo_id, repo_type, **kw)
        repo.commit(files, message="initial")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def requests(self, method: str | None = None, contains: str = "") -> list[str]:
        with self.lock:
            return [p for m, p in self.log if (method is None or m == method) and contains in p]

    def downloaded(self, repo_id: str) -> set[str]:
        """Files whose content was sent (GET .../resolve/...), by path in repo."""
        out = set()
        for p in self.requests("GET", f"{repo_id}/resolve/"):
            out.add(unquote(urlsplit(p).path.split("/resolve/", 1)[1].split("/", 1)[1]))
        return out


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.hub = hub
    return Handler


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        headers = dict(headers or {})
        length = headers.pop("Content-Length", "0") if head else str(len(body))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", length)
        self.end_headers()
        if not head and body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _authed(self) -> bool | None:
        """True: good token; False: no token; None: a bad token (already answered 401)."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return False
        if auth == f"Bearer {GOOD_TOKEN}":
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return None

    def _repo(self, repo_type: str, repo_id: str, *, write: bool = False, files: bool = False) -> Repo | None:
        authed = self._authed()
        if authed is None:
            return None
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(401 if not authed else 404, "RepoNotFound", "Repository not found")
            return None
        if (repo.private or write) and not authed:
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if repo.gated and files:
            self._error(403, "GatedRepo", "Access to this gated repository is restricted; ask for access")
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        with self.hub.lock:
            self.hub.log.append((method, self.path))
        path, query = url.path, parse_qs(url.query)
        for pattern, name in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m and name.startswith(method.lower() + "_"):
                return getattr(self, name)(query, *[unquote(g) if g else g for g in m.groups()])
        self._error(404, None, f"no route {method} {path}")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    # -- reads ---------------------------------------------------------------------------------
    def get_info(self, q: dict, kind: str, repo_id: str, revision: str | None) -> None:
        repo = self._repo(_TYPES[kind], repo_id)
        if repo is None:
            return
        found = repo.at(revision or "main")
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = found
        self._json(200, {"id": repo_id, "_id": sha[:24], "sha": sha, "private": repo.private,
                         "gated": "manual" if repo.gated else False, "disabled": False, "tags": [],
                         "lastModified": "2024-01-01T00:00:00.000Z", "downloads": 0, "likes": 0,
                         "siblings": [{"rfilename": p} for p in sorted(files)]})  # fmt: skip

    def get_tree(self, q: dict, kind: str, repo_id: str, revision: str, sub: str | None) -> None:
        repo = self._repo(_TYPES[kind], repo_id)
        if repo is None:
            return
        found = repo.at(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        entries = []
        for p, data in sorted(found[1].items()):
            if sub and not p.startswith(sub.rstrip("/") + "/"):
                continue
            entry: dict[str, Any] = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
            if p.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def get_resolve(self, q: dict, kind: str | None, repo_id: str, revision: str, name: str) -> None:
        self._resolve(kind, repo_id, revision, name, head=False)

    def head_resolve(self, q: dict, kind: str | None, repo_id: str, revision: str, name: str) -> None:
        self._resolve(kind, repo_id, revision, name, head=True)

    def _resolve(self, kind: str | None, repo_id: str, revision: str, name: str, head: bool) -> None:
        repo = self._repo(_TYPES[kind or "models"], repo_id, files=True)
        if repo is None:
            return
        found = repo.at(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, files = found
        if name not in files:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, head=head)
        data = files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"', "Content-Length": str(len(data)),
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}  # fmt: skip
        if name.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if rng and not head:
            data = data[int(rng.group(1)) :]
            headers["Content-Length"] = str(len(data))
            return self._send(206, data, headers)
        self._send(200, data, headers, head=head)

    # -- writes --------------------------------------------------------------------------------
    def post_create(self, q: dict) -> None:
        body = json.loads(self._body() or b"{}")
        authed = self._authed()
        if authed is None:
            return
        if not authed:
            return self._error(401, None, "You must be authenticated to create a repository")
        repo_id = f"{body.get('organization')}/{body['name']}"
        repo_type = body.get("type") or "model"
        url = f"{self.hub.endpoint}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                          repo_type=repo_type, private=private)  # fmt: skip
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def post_branch(self, q: dict, kind: str, repo_id: str, branch: str) -> None:
        body = json.loads(self._body() or b"{}")
        repo = self._repo(_TYPES[kind], repo_id, write=True)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, None, "Reference already exists")
        start = repo.at(body.get("startingPoint") or "main")
        repo.branches[branch] = start[0] if start else repo.branches["main"]
        self._json(200, {})

    def post_validate(self, q: dict) -> None:
        import yaml

        content = json.loads(self._body())["content"]
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        meta = (yaml.safe_load(m.group(1)) if m else None) or {}
        bases = meta.get("base_model") or []
        bad = [b for b in ([bases] if isinstance(bases, str) else bases) if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", b)]
        if bad or not isinstance(meta, dict):
            msg = f'"base_model" with value "{bad[0]}" is not valid' if bad else "metadata is not a mapping"
            return self._json(400, {"errors": [{"message": msg}], "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def post_preupload(self, q: dict, kind: str, repo_id: str, revision: str) -> None:
        body = json.loads(self._body())
        if self._repo(_TYPES[kind], repo_id, write=True) is None:
            return
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                  "shouldIgnore": False} for f in body["files"]]  # fmt: skip
        self._json(200, {"files": files})

    def post_lfs_batch(self, q: dict, kind: str | None, repo_id: str) -> None:
        body = json.loads(self._body())
        if self._repo(_TYPES[kind or "models"], repo_id, write=True) is None:
            return
        assert body["operation"] == "upload" and "basic" in body["transfers"], body
        objects = []
        for o in body["objects"]:
            entry = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.hub.lfs:
                href = f"{self.hub.endpoint}/__lfs/{o['oid']}/{o['size']}"
                entry["actions"] = {"upload": {"href": href, "header": {}}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def put_lfs(self, q: dict, oid: str, size: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid or len(data) != int(size):
            return self._error(400, None, "LFS object does not match its oid")
        with self.hub.lock:
            self.hub.lfs[oid] = data
        self._send(200)

    def post_commit(self, q: dict, kind: str, repo_id: str, revision: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        repo = self._repo(_TYPES[kind], repo_id, write=True)
        if repo is None:
            return
        found = repo.at(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(found[1])
        header = lines[0]["value"]
        for item in lines[1:]:
            v = item["value"]
            if item["key"] == "file":
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] == "lfsFile":
                if v["oid"] not in self.hub.lfs:
                    return self._error(400, None, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                files[v["path"]] = self.hub.lfs[v["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(v["path"], None)
        pr = q.get("create_pr") == ["1"]
        branch = f"refs/pr/{sum(b.startswith('refs/pr/') for b in repo.branches) + 1}" if pr else revision
        sha = repo.commit(files, branch=branch, message=header["summary"])
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        out = {"commitUrl": f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha}
        if pr:
            out["pullRequestUrl"] = f"{self.hub.endpoint}/{prefix}{repo_id}/discussions/{branch.rsplit('/', 1)[1]}"
        self._json(200, out)


_REPO = r"([\w.-]+/[\w.-]+)"
_ROUTES = [
    (rf"/api/(models|datasets|spaces)/{_REPO}(?:/revision/([^/]+))?", "get_info"),
    (rf"/api/(models|datasets|spaces)/{_REPO}/tree/([^/]+)(?:/(.+))?", "get_tree"),
    (rf"/(?:(datasets|spaces)/)?{_REPO}/resolve/([^/]+)/(.+)", "get_resolve"),
    (rf"/(?:(datasets|spaces)/)?{_REPO}/resolve/([^/]+)/(.+)", "head_resolve"),
    (r"/api/repos/create", "post_create"),
    (r"/api/validate-yaml", "post_validate"),
    (rf"/api/(models|datasets|spaces)/{_REPO}/branch/([^/]+)", "post_branch"),
    (rf"/api/(models|datasets|spaces)/{_REPO}/preupload/([^/]+)", "post_preupload"),
    (rf"/api/(models|datasets|spaces)/{_REPO}/commit/([^/]+)", "post_commit"),
    (rf"/(?:(datasets|spaces)/)?{_REPO}\.git/info/lfs/objects/batch", "post_lfs_batch"),
    (r"/__lfs/([0-9a-f]{64})/(\d+)", "put_lfs"),
]
