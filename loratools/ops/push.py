"""``push``: publish an adapter, merged checkpoint, diffusers folder or ONNX export to the Hub, with a card.

One commit: every file of the folder (hidden ones skipped) plus the generated README.md, sent with
``HfApi.create_commit`` — the call ``upload_folder`` makes, used directly because the card is built in
memory and the user's folder is never modified. huggingface_hub's preupload step routes large files
(``.safetensors`` and anything the Hub marks) through its large-file path (Xet or Git LFS).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratools.errors import InputNotFoundError, LoratoolsError, UsageError


@dataclass
class PushResult:
    """What was (or, with ``dry_run``, would be) pushed."""

    repo_id: str
    files: list[dict[str, Any]]  # {"path": path in repo, "size": bytes}
    card: str
    dry_run: bool
    revision: str | None = None
    repo_url: str | None = None
    commit_url: str | None = None
    commit_sha: str | None = None
    pr_url: str | None = None
    card_source: str = "generated"  # generated | merged (kept an existing README) | replaced | replaced-template
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "dry_run": self.dry_run,
            "revision": self.revision,
            "repo_url": self.repo_url,
            "commit_url": self.commit_url,
            "commit_sha": self.commit_sha,
            "pr_url": self.pr_url,
            "card_source": self.card_source,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "card": self.card,
            "notes": self.notes,
        }


def _files_of(path: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) for everything to upload; hidden files and loratools temporaries skipped."""
    if path.is_file():
        return [(path.name, path)]
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        out.append((rel.as_posix(), f))
    return out


def push(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
    base_model: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    overwrite_card: bool = False,
) -> PushResult:
    """Create ``repo_id`` if needed and upload ``path`` with a model card, in one commit.

    ``revision`` is a branch (created from main when missing); ``create_pr`` opens a pull request instead
    of committing to it. The token comes from ``HF_TOKEN`` or ``hf auth login`` unless ``token`` is given.
    ``dry_run`` builds the file list and the card and contacts nothing.

    Example::

        >>> from loratools import push
        >>> push("adapter/", "me/my-lora", dry_run=True).files[0]["path"]
        'adapter_config.json'
    """
    from loratools.publishing.card import build_card, is_untouched_template
    from loratools.publishing.hub import HubRef, hub_error

    local = Path(path)
    if not local.exists():
        raise InputNotFoundError(f"{path}: no such file or folder to push", path=local)
    if repo_id.startswith("hf://"):
        repo_id = repo_id[len("hf://") :]
    _check_repo_id(repo_id)
    files = [(rel, f) for rel, f in _files_of(local) if rel != "README.md"]
    if not files:
        raise UsageError(f"{path}: nothing to push (the folder is empty)")
    readme = local / "README.md" if local.is_dir() else None
    existing = readme.read_text(encoding="utf-8") if readme is not None and readme.is_file() else None
    card = build_card(local, repo_id, base_model=base_model, existing=existing, overwrite=overwrite_card)
    card_text = str(card)
    source = "generated" if existing is None else ("replaced" if overwrite_card else "merged")
    if source == "merged" and is_untouched_template(existing):
        source = "replaced-template"
    listing = [{"path": rel, "size": f.stat().st_size} for rel, f in files]
    listing.append({"path": "README.md", "size": len(card_text.encode("utf-8"))})
    result = PushResult(repo_id, listing, card_text, dry_run, revision=revision, card_source=source)
    if not card.data.get("base_model"):
        result.notes.append("the card names no base model: pass --base-model ORG/NAME")
    if dry_run:
        return result

    from huggingface_hub import CommitOperationAdd, HfApi

    ref = HubRef(repo_id, spec=f"hf://{repo_id}")
    api = HfApi(token=token)
    with _quiet_progress():
        try:
            result.repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True))
            if revision and not create_pr:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(f)) for rel, f in files]
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
            info = api.create_commit(
                repo_id,
                operations=operations,
                commit_message=message or f"Upload {local.name} with loratools",
                revision=revision,
                create_pr=create_pr,
            )
        except LoratoolsError:
            raise
        except Exception as exc:
            raise hub_error(_unwrap(exc), ref, writing=True) from None
    result.commit_url = info.commit_url
    result.commit_sha = info.oid
    result.pr_url = info.pr_url
    return result


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """huggingface_hub's upload bars only on a terminal (stderr); never in pipes, logs or tests."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if sys.stderr.isatty() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _unwrap(exc: BaseException) -> BaseException:
    """huggingface_hub wraps upload failures in RuntimeError; the cause says what the Hub answered."""
    while isinstance(exc, RuntimeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a repository id ({exc})", hint="write ORG/NAME") from None
    if "/" not in repo_id:
        raise UsageError(f"{repo_id!r} has no namespace", hint="write ORG/NAME (your user name or an organization)")
