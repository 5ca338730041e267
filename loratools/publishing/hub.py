"""Hub references -> local paths, through huggingface_hub's own parser, cache and downloader.

An input is a local path as given; ``hf://[datasets/]ORG/NAME[@REVISION][/PATH]`` (parsed by
``huggingface_hub.parse_hf_uri``, the parser behind ``HfFileSystem.resolve_path``: a revision with a
slash is written URL-encoded, ``refs/pr/N`` verbatim); or a bare ``ORG/NAME`` when no local path of that
name exists. The repository's file list decides what to fetch (:mod:`loratools.publishing.hub_select`), and
``snapshot_download(allow_patterns=...)`` fetches exactly those names into the Hugging Face cache
(``HF_HOME``), so a second run or ``HF_HUB_OFFLINE=1`` reuses it. Token: ``HF_TOKEN`` or ``hf auth login``.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratools.errors import HubError, InputNotFoundError, LoratoolsError, UnsafeInputError, UsageError
from loratools.publishing.hub_select import check_names, select_files

HF_PREFIX = "hf://"
_BARE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./%-]+)?$")
_FILE_SUFFIXES = (".safetensors", ".bin", ".json", ".onnx", ".onnx_adapter", ".pt", ".pth", ".ckpt", ".gguf")
#: local path (as a string) -> the Hub reference it was resolved from, for provenance
_RESOLVED: dict[str, dict[str, str]] = {}


@dataclass(frozen=True)
class HubRef:
    """One parsed Hub reference."""

    repo_id: str
    repo_type: str = "model"
    revision: str | None = None
    path_in_repo: str = ""
    spec: str = ""

    @property
    def label(self) -> str:
        return self.spec or f"{HF_PREFIX}{self.repo_id}"

    @property
    def web_url(self) -> str:
        from huggingface_hub import constants

        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{constants.ENDPOINT}/{prefix}{self.repo_id}"


def parse_hub_spec(spec: str) -> HubRef:
    """Parse ``hf://...`` with huggingface_hub's parser; a malformed one is a :class:`UsageError`."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    try:
        uri = parse_hf_uri(spec)
    except HfUriError as exc:
        raise UsageError(
            f"{spec}: not a valid Hub reference ({exc})",
            hint="write hf://ORG/NAME, hf://ORG/NAME@REVISION/PATH or hf://datasets/ORG/NAME",
        ) from None
    if uri.is_bucket:
        raise UsageError(f"{spec}: Hub buckets are not supported", hint="point at a model or dataset repository")
    return HubRef(uri.id, uri.type, uri.revision, uri.path_in_repo.strip("/"), spec)


def _bare_ref(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV]`` that could be a Hub repository (and not an obviously local path), else None."""
    if not _BARE.match(spec) or spec.lower().endswith(_FILE_SUFFIXES):
        return None
    if Path(spec.split("/", 1)[0]).is_dir():  # the first part is a local folder: a local path was meant
        return None
    try:
        ref = parse_hub_spec(HF_PREFIX + spec)
    except UsageError:
        return None
    return HubRef(ref.repo_id, ref.repo_type, ref.revision, ref.path_in_repo, spec)


def resolve_path(spec: str | Path, purpose: str = "adapter") -> Path:
    """A local path for ``spec``: a path as given, or an ``hf://`` / ``ORG/NAME`` Hub reference."""
    return resolve_input(spec, purpose)


def resolve_input(spec: str | Path, purpose: str = "adapter") -> Path:
    """A local path for ``spec``: a local path as given, else the Hub snapshot of an ``hf://`` / ``ORG/NAME`` ref.

    ``purpose`` ("adapter", "base checkpoint", anything with "onnx") decides which files are fetched.
    Raises :class:`InputNotFoundError` / :class:`HubError` with one line and a hint.
    """
    if isinstance(spec, Path):
        if not spec.exists():
            raise InputNotFoundError(f"{spec}: no such {purpose} file or folder", path=spec)
        return spec
    text = str(spec)
    if text.startswith(HF_PREFIX):
        return resolve_hub(parse_hub_spec(text), purpose)
    local = Path(text).expanduser()
    if local.exists():
        return local
    ref = _bare_ref(text)
    if ref is None:
        raise InputNotFoundError(f"{spec}: no such {purpose} file or folder", path=local)
    try:
        return resolve_hub(ref, purpose)
    except LoratoolsError as exc:
        reason = _strip_label(exc.message, ref)
        raise InputNotFoundError(  # the local lookup failed first: a missing input, whatever the Hub said
            f"{spec}: no such local {purpose} file or folder, and the Hub lookup failed too: {reason}",
            hint=exc.hint,
            path=exc.path,
        ) from None


def _strip_label(message: str, ref: HubRef) -> str:
    return message[len(ref.label) + 2 :] if message.startswith(ref.label + ": ") else message


def resolve_hub(ref: HubRef, purpose: str = "adapter") -> Path:
    """Download (or find in the cache) what ``purpose`` needs from ``ref``; the local path of ``ref``'s PATH."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        try:
            info = HfApi().repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision)
        except Exception as exc:
            if not (_unreachable(exc) or getattr(getattr(exc, "response", None), "status_code", 0) >= 500):
                raise
            return _from_cache(ref, purpose, exc)  # offline, no network or a Hub outage: the cache may serve
        names = [s.rfilename for s in info.siblings or []]
        check_names(names, ref.label)
        wanted = select_files(names, ref.path_in_repo, purpose, ref.label)
        folder = snapshot_download(
            ref.repo_id,
            repo_type=ref.repo_type,
            revision=ref.revision,
            allow_patterns=[_escape(n) for n in wanted],
            tqdm_class=_tqdm_class(),
        )
    except LoratoolsError:
        raise
    except Exception as exc:
        raise hub_error(exc, ref) from None
    return _finish(ref, Path(folder), wanted, info.sha or Path(folder).name)


def _from_cache(ref: HubRef, purpose: str, cause: BaseException) -> Path:
    """Offline (HF_HUB_OFFLINE=1) or unreachable Hub: the cached snapshot of the revision, if any."""
    from huggingface_hub import snapshot_download

    try:
        # an empty allow list asks only "which cached snapshot is this revision?"
        folder = Path(
            snapshot_download(
                ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, local_files_only=True, allow_patterns=[]
            )
        )
    except Exception:
        offline = _offline()
        raise HubError(
            f"{ref.label}: not in the local Hugging Face cache, and "
            + (
                "HF_HUB_OFFLINE=1 forbids downloading it" if offline else f"the Hub cannot be reached ({_short(cause)})"
            ),
            hint="run the command once online to fill the cache" + ("" if offline else ", or check the network"),
        ) from None
    names = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    check_names(names, ref.label)
    wanted = select_files(names, ref.path_in_repo, purpose, ref.label)
    return _finish(ref, folder, wanted, folder.name)


def _finish(ref: HubRef, folder: Path, wanted: list[str], sha: str) -> Path:
    root = Path(os.path.abspath(folder))
    store = root.parent.parent  # .../models--ORG--NAME
    for name in wanted:
        local = Path(os.path.abspath(root / name))
        if root not in local.parents:
            raise UnsafeInputError(f"{ref.label}: file name {name!r} leaves the download folder")
        if not local.is_file():
            raise HubError(f"{ref.label}: {name} did not arrive in {root}", hint="run the command again online")
        real = local.resolve()
        if store.resolve() not in real.parents:
            raise UnsafeInputError(f"{ref.label}: {name} links outside the Hugging Face cache ({real})")
    target = root / ref.path_in_repo if ref.path_in_repo else root
    record = {
        "hub": f"{HF_PREFIX}{_type_prefix(ref.repo_type)}{ref.repo_id}",
        "repo_id": ref.repo_id,
        "repo_type": ref.repo_type,
        "revision": sha,
    }
    if ref.revision and ref.revision != sha:
        record["requested_revision"] = ref.revision
    if ref.path_in_repo:
        record["path"] = ref.path_in_repo
    _RESOLVED[os.path.abspath(target)] = record
    _RESOLVED[ref.label] = record
    return target


def hub_info_for(path: str | Path) -> dict[str, str] | None:
    """The Hub id and commit of a path that came from the Hub (for provenance records), else None.

    Knows the specs and paths this process resolved, and any path inside the Hugging Face cache
    (``.../models--ORG--NAME/snapshots/<commit>/...``).
    """
    text = str(path)
    if text in _RESOLVED:  # the spec as the user wrote it (hf://..., ORG/NAME)
        return dict(_RESOLVED[text])
    if text.startswith(HF_PREFIX):
        return None
    key = os.path.abspath(path)
    if key in _RESOLVED:
        return dict(_RESOLVED[key])
    parts = Path(key).parts
    for i in range(len(parts) - 2):
        kind, sep, rest = parts[i].partition("--")
        if sep and kind in ("models", "datasets", "spaces") and parts[i + 1] == "snapshots" and "--" in rest:
            repo_id = rest.replace("--", "/", 1)
            record = {
                "hub": f"{HF_PREFIX}{_type_prefix(kind[:-1])}{repo_id}",
                "repo_id": repo_id,
                "repo_type": kind[:-1],
                "revision": parts[i + 2],
            }
            if len(parts) > i + 3:
                record["path"] = "/".join(parts[i + 3 :])
            return record
    return None


def _type_prefix(repo_type: str) -> str:
    return "" if repo_type == "model" else f"{repo_type}s/"


def _escape(name: str) -> str:
    """A literal file name as an fnmatch pattern."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _unreachable(exc: BaseException) -> bool:
    """Offline mode, DNS/connection failures and timeouts: the cache may still serve."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(exc, OfflineModeIsEnabled | httpx2.ConnectError | httpx2.TimeoutException)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:160]}" if text else exc.__class__.__name__


def hub_error(exc: BaseException, ref: HubRef, *, writing: bool = False) -> LoratoolsError:
    """One clear loratools error for a huggingface_hub exception."""
    import httpx2
    from huggingface_hub import errors as e

    label = ref.label
    login = f"run `hf auth login` or set HF_TOKEN to a token that can {'write' if writing else 'read'} it"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if writing and status == 401:
        return HubError(f"{label}: the Hub answered 401: not logged in, or the token cannot write there", hint=login)
    if isinstance(exc, e.GatedRepoError):
        return HubError(
            f"{label}: the repository is gated and your account has not been granted access ({status})",
            hint=f"accept its conditions at {ref.web_url}, then use that account's token (HF_TOKEN or hf auth login)",
        )
    if isinstance(exc, e.RepositoryNotFoundError):
        if status == 401:
            return HubError(
                f"{label}: the Hub answered 401: the repository does not exist or is private and you are not"
                " logged in (or your token cannot read it)",
                hint=f"check the name; for a private repository {login}",
            )
        return InputNotFoundError(
            f"{label}: no such repository on the Hub ({ref.repo_type} {ref.repo_id})",
            hint="check the ORG/NAME spelling (datasets are hf://datasets/ORG/NAME)",
        )
    if isinstance(exc, e.RevisionNotFoundError):
        return InputNotFoundError(
            f"{label}: the repository has no revision {ref.revision!r}",
            hint="name an existing branch, tag or commit after @ (a slash in a branch name is written %2F)",
        )
    if isinstance(exc, e.EntryNotFoundError):
        return InputNotFoundError(f"{label}: a file is missing on the Hub ({_short(exc)})")
    if isinstance(exc, e.HfHubHTTPError) and status == 401:
        return HubError(f"{label}: the Hub rejected the token (401)", hint=login)
    if isinstance(exc, e.HfHubHTTPError) and status == 403:
        return HubError(
            f"{label}: the Hub refused access (403)",
            hint="use a token with write access to this namespace" if writing else login,
        )
    if _unreachable(exc):
        if _offline():
            return HubError(f"{label}: HF_HUB_OFFLINE=1 forbids contacting the Hub", hint="unset HF_HUB_OFFLINE")
        from huggingface_hub import constants

        return HubError(f"{label}: cannot reach {constants.ENDPOINT} ({_short(exc)})", hint="check the network")
    if isinstance(exc, httpx2.HTTPError) and not isinstance(exc, e.HfHubHTTPError):
        from huggingface_hub import constants

        return HubError(f"{label}: talking to {constants.ENDPOINT} failed ({_short(exc)})", hint="try again later")
    if isinstance(exc, e.HfHubHTTPError):
        server = getattr(exc, "server_message", None) or _short(exc)
        return HubError(f"{label}: the Hub answered {status}: {server}")
    if isinstance(exc, ValueError | OSError):
        return HubError(f"{label}: {_short(exc)}")
    raise exc


def _tqdm_class() -> Any:
    """huggingface_hub's progress bars only on a terminal (stderr), never in pipes or tests."""
    if sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    class _Quiet(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return _Quiet
