"""``loratools push``: upload an adapter, merged checkpoint, diffusers folder or ONNX export with a model card."""

from __future__ import annotations

from typing import Any

import click

from loratools.cli.options import json_option
from loratools.cli.output import get_output, render_table


@click.command("push")
@click.argument("path", type=click.Path(exists=True, path_type=str))
@click.argument("repo_id", type=str)
@click.option("--private", is_flag=True, help="Create the repository as private (an existing one keeps its own).")
@click.option("--revision", default=None, help="Branch to commit to (created from main when missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--message", "-m", default=None, help="Commit message.")
@click.option("--base-model", default=None, help="Hub id of the base model for the card (else from config/provenance).")
@click.option("--overwrite-card", is_flag=True, help="Replace an existing README.md instead of completing it.")
@click.option("--dry-run", is_flag=True, help="Print the files and the card; send nothing.")
@click.option("--token", default=None, help="Hub token; prefer HF_TOKEN or `hf auth login` (a flag shows in ps).")
@json_option
@click.pass_context
def push(
    ctx: click.Context,
    path: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    message: str | None,
    base_model: str | None,
    overwrite_card: bool,
    dry_run: bool,
    token: str | None,
    json_mode: bool,
) -> None:
    """Upload PATH to the Hub repository REPO_ID (ORG/NAME) with a generated model card.

    The card's front matter gets base_model, library_name and the tags lora and loratools; its body
    the rank, alpha, targets, parameter count and how PATH was made. A README.md in PATH keeps its
    text and only gains missing metadata, unless --overwrite-card; PEFT's untouched template README
    is replaced by the generated card.

    \b
    Examples:
      loratools push adapter/ me/llama-lora --dry-run
      loratools push adapter/ me/llama-lora --base-model meta-llama/Llama-3.2-1B
      loratools push merged/ me/llama-merged --private --create-pr -m "Merged rank-16 LoRA"
    """
    from loratools.ops.push import push as run_push

    out = get_output(ctx, json_mode)
    result = run_push(
        path,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        message=message,
        base_model=base_model,
        dry_run=dry_run,
        token=token,
        overwrite_card=overwrite_card,
    )
    for note in result.notes:
        out.note(f"Note: {note}")
    out.result(result.to_dict(), _human)


def _human(d: dict[str, Any]) -> None:
    from loratools.publishing.publish import format_bytes

    click.echo(render_table(["file", "size"], [(f["path"], format_bytes(f["size"])) for f in d["files"]]))
    if d["dry_run"]:
        click.echo(f"\n--- README.md ({d['card_source']}) ---\n{d['card']}")
        click.echo(f"Dry run: {len(d['files'])} files ({format_bytes(d['total_bytes'])}) not sent to {d['repo_id']}.")
        return
    where = d["pr_url"] or d["commit_url"]
    click.echo(f"Pushed {len(d['files'])} files ({format_bytes(d['total_bytes'])}) to {d['repo_id']}: {where}")
