"""``loratools validate``: every problem of an adapter, alone or against its base."""

from __future__ import annotations

import click

from loratools.cli.options import allow_other_base_option, base_option, json_option
from loratools.cli.output import get_output


@click.command("validate")
@click.argument("adapter", type=str)
@base_option
@click.option(
    "--target",
    type=click.Choice(["vllm", "sglang", "llama.cpp", "ollama", "onnxruntime-genai"]),
    default=None,
    help="Also report what this serving runtime would reject or silently ignore (see docs/formats.md).",
)
@click.option("--scan", is_flag=True, help="Also flag modules that stand out from their family (see docs/security.md).")
@click.option(
    "--reference",
    default=None,
    metavar="BASE16",
    help="With a quantized --base: the 16-bit model it was quantized from; reports |W16 - deq(Wq)| / |dW| per "
    "module and which base to merge into (see docs/quantized.md).",
)
@allow_other_base_option
@json_option
@click.pass_context
def validate(
    ctx: click.Context,
    adapter: str,
    base: str | None,
    target: str | None,
    scan: bool,
    reference: str | None,
    allow_other_base: bool,
    json_mode: bool,
) -> None:
    """Check an adapter: A/B present and rank-consistent, config agrees with the tensors, float
    dtypes, no NaN/Inf; with --base, every module resolves to a base weight of the right shape; a
    quantized base (bitsandbytes, FP8, GPTQ, AWQ, MXFP4, compressed-tensors, MLX) is described, and
    --reference compares it with its 16-bit original.

    Exit code 0: no errors (warnings allowed); 1: errors found; 2: the input cannot be read.

    \b
    Examples:
      loratools validate fixtures/peft/llama-lora
      loratools validate fixtures/peft/llama-lora --base fixtures/bases/llama --json
      loratools validate fixtures/peft/llama-lora --target vllm
      loratools validate fixtures/moe/qwen3-moe-lora --target vllm
      loratools validate fixtures/peft/llama-rslora --target ollama --base fixtures/gguf/llama-q8_0.gguf
      loratools validate fixtures/peft/llama-lora --scan
      loratools validate qlora/ --base model-bnb-4bit/ --reference model-bf16/
    """
    from loratools.errors import UsageError
    from loratools.ops.validate import validate as run_validate

    if reference is not None and base is None:
        raise UsageError("--reference needs --base QUANT_BASE", hint="give the quantized base with --base")
    out = get_output(ctx, json_mode)
    report = run_validate(
        adapter, base=base, target=target, scan=scan, reference=reference, allow_other_base=allow_other_base
    )
    data = report.to_dict()
    out.result(data, _human)
    if not report.usable and not json_mode:
        # unreadable input reads like every other command's error: one line and a hint, on stderr
        for f in report.errors:
            click.echo(f"Error: {f.message}", err=True)
            if f.hint:
                click.echo(f"Hint: {f.hint}", err=True)
    ctx.exit(report.exit_code)


def _human(d: dict) -> None:
    if not d["usable"]:
        return
    findings = d["findings"]
    facts = [d["format"]]
    if d["modules_checked"]:
        facts.append(f"{d['modules_checked']} modules")
    if d["base"]:
        facts.append(f"against {d['base']}")
    where = f"{d['path']} ({', '.join(facts)})"
    if d.get("quantized_base"):
        from loratools.cli.quant_render import render_quant_report

        render_quant_report(d["quantized_base"])
    if not findings:
        click.echo(f"{where}: OK, no problems found")
        return
    click.echo(f"{where}: {d['errors']} error(s), {d['warnings']} warning(s)")
    # messages name their module and tensor; the JSON output has them as fields
    for f in findings:
        click.echo(f"  {f['severity']:<7} {f['code']}: {f['message']}")
    hints = sorted({f["hint"] for f in findings if f["hint"]})
    for h in hints:
        click.echo(f"Hint: {h}")
