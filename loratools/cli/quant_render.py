"""Human rendering of a quantized base's report (``merge``, ``validate``): scheme, worst modules, advice."""

from __future__ import annotations

from typing import Any

import click

#: rows shown in the human table (all of them are in --json)
SHOWN = 8


def describe_scheme(q: dict[str, Any]) -> str:
    """``bnb-4bit (nf4, blocksize 64, double quant), compute dtype bfloat16, 14 quantized tensors``."""
    s = q.get("settings") or {}
    parts = []
    if s.get("quant_type"):
        parts.append(str(s["quant_type"]))
    for key, label in (("blocksize", "blocksize"), ("group_size", "group size"), ("bits", "bits")):
        if s.get(key) is not None and not (key == "bits" and q.get("bits")):
            parts.append(f"{label} {s[key]}")
    if s.get("block"):
        parts.append(f"blocks {'x'.join(str(b) for b in s['block'])}")
    elif q.get("scheme") == "fp8":
        parts.append("per-tensor scale")
    if s.get("nested"):
        parts.append("double quant")
    if s.get("desc_act"):
        parts.append("act-order")
    inner = f" ({', '.join(parts)})" if parts else ""
    bits = f"{q.get('bits')}-bit " if q.get("bits") and q.get("scheme") in ("gptq", "awq") else ""
    return (
        f"{bits}{q.get('scheme')}{inner}, compute dtype {q.get('compute_dtype')}, "
        f"{q.get('quantized_tensors')} quantized tensors"
    )


def render_quant_report(r: dict[str, Any]) -> None:
    """The ``quantized_base`` part of a merge or validate result."""
    where = {"quantized": "deq(Wq)", "reference": "the 16-bit reference"}.get(r.get("merged_into"), "")
    removed = {
        "comfy-scaled-fp8": "scale_weight tensors and the scaled_fp8 marker removed",
        "mlx-affine": "config.json's quantization removed",
    }.get((r.get("quantization") or {}).get("scheme"), "quantization_config removed")
    written = {"16-bit": f"written as a 16-bit checkpoint ({removed})"}.get(
        r.get("output") or "", "requantized with the base's own settings"
    )
    if r.get("output") == "none":
        written = "not merged"
    click.echo(f"quantized base: {describe_scheme(r.get('quantization') or {})}")
    if r.get("output") != "none":
        click.echo(f"  merged into {where}, {written}")
    rows = r.get("modules") or []
    has_rho = any(m.get("rho") is not None for m in rows)
    has_gap = any(m.get("gap") is not None for m in rows)
    if rows and (has_rho or has_gap):
        key = "rho" if has_rho else "gap"
        ordered = sorted(rows, key=lambda m: m[key], reverse=key == "gap")[:SHOWN]
        label = "lowest rho (share of the update that survives requantization)" if has_rho else "largest gaps"
        click.echo(f"  {len(rows)} tensors; {label}:")  # rows are base tensors (an MXFP4 row holds every expert)
        width = max(len(m["tensor"]) for m in ordered)
        head = f"    {'tensor':<{width}}  {'|dW|':>9}" + ("  {:>7}".format("rho") if has_rho else "")
        head += "  {:>9}".format("gap") if has_gap else ""
        click.echo(head)
        for m in ordered:
            line = f"    {m['tensor']:<{width}}  {m['delta_norm']:>9.4g}"
            if has_rho:
                line += f"  {m['rho']:>7.3f}"
            if has_gap:
                line += f"  {m['gap']:>9.3g}"
            click.echo(line)
        medians = []
        if r.get("median_rho") is not None:
            medians.append(f"median rho {r['median_rho']:.3f}")
        if r.get("median_gap") is not None:
            medians.append(f"median gap {r['median_gap']:.3g} (|W16 - deq(Wq)| / |dW|)")
        if medians:
            click.echo("  " + ", ".join(medians))
    for w in r.get("warnings") or []:
        click.echo(f"Warning: {w}")
    if r.get("recommendation"):
        click.echo(f"Recommendation: {r['recommendation']}")
