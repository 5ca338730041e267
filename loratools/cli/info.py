"""``loratools info``: what an adapter holds."""

from __future__ import annotations

from typing import Any

import click

from loratools.cli.options import base_option, json_option
from loratools.cli.output import get_output, render_table

#: metadata values longer than this are shortened in human output (kohya's ss_tag_frequency is huge)
_MAX_VALUE = 80


@click.command("info")
@click.argument("adapter", type=str)
@base_option
@json_option
@click.pass_context
def info(ctx: click.Context, adapter: str, base: str | None, json_mode: bool) -> None:
    """Show what an adapter holds: format, ranks, alphas, scale, targets, parameters, metadata.

    ADAPTER is a PEFT folder (adapter_config.json + weights) or any other supported adapter file.
    With --base, module names are matched to the base checkpoint and the parameter share is shown.
    A checkpoint written by `loratools merge` (safetensors or GGUF) shows what was merged into it (its
    provenance record); a base model (GGUF or safetensors) is named as what it is, with the command that
    takes it, and exit code 2.

    \b
    Examples:
      loratools info fixtures/peft/llama-lora
      loratools info fixtures/peft/llama-lora --base fixtures/bases/llama
      loratools info fixtures/peft/llama-lora --json | jq .modules[0]
    """
    from loratools.ops.info import info as run_info

    out = get_output(ctx, json_mode)
    out.result(run_info(adapter, base=base), _human)


def _fmt_number(n: int) -> str:
    return f"{n:,}"


def _human(d: dict[str, Any]) -> None:
    from loratools.publishing.publish import format_bytes

    if d.get("kind") == "merged checkpoint":
        _human_merged(d)
        return

    def same_or_list(one: Any, many: list[Any]) -> str:
        return str(one) if one is not None else ", ".join(str(x) for x in many) + " (varies)"

    scale = f"{d['scale']:.4g}" if d["scale"] is not None else ("varies" if d["alphas"] else "-")
    names = {"loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT", "ia3": "(IA)³", "diag_oft": "diag-OFT"}
    families = [names[f] for f in d.get("families", []) if f in names]
    flags = [f for f, on in (("rsLoRA", d["use_rslora"]), ("DoRA", d["use_dora"]), ("lora bias", d["lora_bias"])) if on]
    if d.get("alora_invocation_tokens"):
        flags.append(f"aLoRA (acts from invocation tokens {d['alora_invocation_tokens']} on)")
    params = _fmt_number(d["parameters"])
    if d.get("base_parameters"):
        params += f" ({100 * d['parameter_share']:.3g}% of the base's {_fmt_number(d['base_parameters'])})"
    rows = [
        ("path", d["path"]),
        ("format", d["format"]),
        *([("family", "{label} ({layout} layout)".format(**d["dit"]))] if d.get("dit") else []),
        ("base model", d["base_model"] or "-"),
        ("modules", f"{d['num_modules']} ({', '.join(d['kinds'] + (['?'] if _kind_unknown(d) else [])) or '-'})"),
        ("targets", ", ".join(d["target_modules"]) or "-"),
        ("rank", same_or_list(d["rank"], d["ranks"])),
        ("alpha", (same_or_list(d["alpha"], d["alphas"]) if d["alphas"] else "-") + _assumed(d)),
        ("scale", scale),
        ("variants", ", ".join(families + flags) or "plain LoRA"),
        ("parameters", params),
        ("dtype", d["dtype"] or ", ".join(d["dtypes"])),
        ("size on disk", format_bytes(d["size_on_disk"])),
    ]
    rows += _expert_rows(d.get("experts") or [])
    copies = set(d.get("saved_base_layers") or [])
    trained = [r for r in d["replacements"] if r["name"] not in copies]
    if trained:
        rows.append(("full tensors", ", ".join(f"{r['name']} {r['shape']}" for r in trained)))
    for name, indices in (d.get("trainable_tokens") or {}).items():
        shown = ", ".join(map(str, indices[:8])) + (" ..." if len(indices) > 8 else "")
        rows.append(("trained tokens", f"{name}: {len(indices)} rows ({shown})"))
    if copies:
        rows.append(("base layers", ", ".join(sorted(copies)) + " (saved copies of the base, not trained)"))
    if d.get("unresolved"):
        missing = d["unresolved"]
        shown = ", ".join(missing[:3]) + (
            f", ... ({len(missing)} of {d['num_modules']} modules)" if len(missing) > 3 else ""
        )
        rows.append(("not in base", shown))
    if d.get("base_quantization"):
        from loratools.cli.quant_render import describe_scheme

        rows.append(("base quantized", describe_scheme(d["base_quantization"])))
    if d["provenance"]:
        p = d["provenance"]
        rows.append(("made by", f"loratools {p.get('loratools_version', '?')} {p.get('operation', '?')}"))
    for k, v in sorted(d["metadata"].items()):
        v = str(v)
        if (k, v) == ("format", "pt"):  # safetensors' torch marker, not information
            continue
        rows.append((k, v if len(v) <= _MAX_VALUE else v[: _MAX_VALUE - 3] + "..."))
    rows += [("note" if i == 0 else "", n) for i, n in enumerate(d.get("notes") or [])]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")
    if d["modules"]:
        click.echo()
        headers = ["module", "kind", "rank", "alpha", "scale", "in", "out"]
        table = [
            [m["name"], _kind(m), m["rank"], m["alpha"], m["scale"], m["in_features"], m["out_features"]]
            for m in d["modules"]
        ]
        click.echo(render_table(headers, table))


def _expert_rows(groups: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One row per stacked expert parameter: its expert count, rank per expert and the experts touched."""
    rows = []
    for g in groups:
        rank = g["rank"] if g["rank"] is not None else "/".join(map(str, g["ranks"]))
        n, touched = g["num_experts"], g["touched"]
        which = "all" if len(touched) == n else (", ".join(map(str, touched)) or "none")
        layout = g["layout"] + ("" if g["layout_known"] else " (assumed; the base decides)")
        line = f"{g['parameter']}: {n} experts, rank {rank} each, {layout}, touched: {which}"
        rows.append(("experts" if not rows else "", line))
    return rows


def _kind_unknown(d: dict[str, Any]) -> bool:
    return any(m["kind"] is None for m in d["modules"])


def _kind(m: dict[str, Any]) -> str:
    """``conv 3x3`` for a conv (its ``in`` is in_channels·kh·kw), ``?`` where the file does not tell."""
    if m["kind"] is None:
        return "?"
    if m["kind"] == "conv" and m.get("kernel_size"):
        return "conv " + "x".join(map(str, m["kernel_size"]))
    return m["kind"]


def _assumed(d: dict[str, Any]) -> str:
    """`` (assumed)`` when no module's alpha is stored in the file (a partial share is in the notes)."""
    assumed = d.get("alpha_assumed") or []
    return " (assumed: the file stores none)" if assumed and len(assumed) == d["num_modules"] else ""


def _human_merged(d: dict[str, Any]) -> None:
    weights = d.get("weights") or [1.0] * len(d["adapters"])
    rows = [
        ("path", d["path"]),
        ("kind", f"{d['kind']} ({d['tensors']} tensors)"),
        ("base", d["base"] or "-"),
        *([("architecture", d["architecture"])] if d.get("architecture") else []),
    ]
    for i, (adapter, w) in enumerate(zip(d["adapters"], weights, strict=False)):
        rows.append(("merged" if i == 0 else "", f"{adapter} (weight {w:g})"))
    p = d["provenance"]
    rows.append(("made by", f"loratools {p.get('loratools_version', '?')} merge"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")
