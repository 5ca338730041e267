"""``loratools convert``: an adapter in another format (peft, kohya, diffusers, ...), every ΔW unchanged."""

from __future__ import annotations

from typing import Any

import click

from loratools.args.numeric_args import FRACTION
from loratools.cli.options import (
    Number,
    allow_other_base_option,
    base_option,
    dtype_option,
    filters,
    json_option,
    output_option,
    overwrite_option,
    rank_option,
    trust_tensors_option,
)
from loratools.cli.output import get_output


class FormatChoice(click.Choice):
    """The registered adapter formats, looked up only when needed (the registry imports torch)."""

    def __init__(self) -> None:
        super().__init__([], case_sensitive=True)

    @property  # type: ignore[override]
    def choices(self) -> list[str]:  # noqa: D102
        from loratools.formats.registry import list_formats

        return list_formats()

    @choices.setter
    def choices(self, value: Any) -> None:
        pass


@click.command("convert")
@click.argument("adapter", type=str)
@click.option(
    "--to", "to", default=None, type=FormatChoice(),
    help="Target format (any registered format); with --for-base/--remap-prefix alone, the adapter's own.",
)  # fmt: skip
@base_option
@click.option(
    "--for-base",
    default=None,
    metavar="MODEL",
    help="Rewrite module path prefixes so every module binds to MODEL's module tree, the names PEFT and "
    "vLLM load adapters by (a text-only adapter for a vision-language wrapper, or back).",
)
@click.option(
    "--remap-prefix",
    multiple=True,
    metavar="OLD=NEW",
    help="Rename module paths starting with OLD (repeatable; the longest OLD wins), e.g. "
    "model.=model.language_model.",
)
@click.option(
    "--kohya-prefix",
    default=None,
    help="kohya name prefix for modules outside a pipeline component (for example lora_te_).",
)
@filters
@dtype_option
@click.option(
    "--for",
    "--model",
    "model",
    default=None,
    metavar="MODEL.onnx",
    help="onnx-adapter only, and required there: the ONNX model (slot graph, onnxruntime-genai builder model) "
    "whose LoRA inputs name, size and rank the tensors.",
)
@click.option(
    "--outtype",
    type=click.Choice(["f32", "f16", "bf16", "q8_0"]),
    default=None,
    help="GGUF tensor type (gguf only; default: the adapter's float type).",
)
@click.option("--ollama", is_flag=True, help="Also write an Ollama Modelfile beside the GGUF adapter (gguf only).")
@click.option(
    "--as-lora",
    is_flag=True,
    help="Lower every module to plain LoRA (LoHa, LoKr, OFT, BOFT, IA3, DoRA, modules_to_save): exact by "
    "default; OFT/BOFT/IA3/DoRA/modules_to_save need --base.",
)
@rank_option("With --as-lora: keep at most this rank (optimal truncation).")
@click.option(
    "--fro",
    type=Number(FRACTION),
    default=None,
    help="With --as-lora: keep the smallest rank retaining this fraction of ‖ΔW‖_F.",
)
@output_option
@overwrite_option
@trust_tensors_option
@allow_other_base_option
@json_option
@click.pass_context
def convert(
    ctx: click.Context,
    adapter: str,
    to: str | None,
    base: str | None,
    for_base: str | None,
    remap_prefix: tuple[str, ...],
    kohya_prefix: str | None,
    include: str | None,
    exclude: str | None,
    dtype: str,
    model: str | None,
    outtype: str | None,
    ollama: bool,
    as_lora: bool,
    rank: int | None,
    fro: float | None,
    output: str,
    overwrite: bool,
    json_mode: bool,
    trust_tensors: bool,
    allow_other_base: bool,
) -> None:
    """Convert ADAPTER to another format, losslessly: every module's ΔW is unchanged and alpha is kept
    or folded exactly. What the target cannot hold (an embedding LoRA or modules_to_save in a kohya
    file, say) is refused with the list of modules. PEFT, diffusers and vllm-moe outputs are folders, kohya
    and comfyui one .safetensors file. Leaving kohya needs --base to resolve its underscore names; an adapter that
    is not for a diffusers pipeline needs --kohya-prefix to become a kohya file. A GGUF adapter (for
    llama.cpp, Ollama, LM Studio) is written for one base: --base names the .gguf model or its Hugging
    Face folder; every module's exact scale is kept. --for-base MODEL rewrites module path prefixes
    so the adapter binds to MODEL where PEFT and vLLM look (validate --base says when it does not).

    \b
    Examples:
      loratools convert style.safetensors --to peft --base sd15-pipeline/ -o style-peft/
      loratools convert style-peft/ --to kohya -o style.safetensors
      loratools convert style.safetensors --to peft --base sd15/unet --exclude '^lora_te' -o unet-peft/
      loratools convert pytorch_lora_weights/ --to kohya -o style.safetensors
      loratools convert llama-lora/ --to kohya --kohya-prefix lora_te_ -o llama.safetensors
      loratools convert llama-lora/ --to onnx-adapter --for genai-model/model.onnx -o a.onnx_adapter
      loratools convert llama-lora/ --to gguf --base model.gguf -o adapter.gguf --ollama
      loratools convert adapter.gguf --to peft -o llama-lora/
      loratools convert flux-kohya.safetensors --to diffusers -o flux-diffusers/
      loratools convert wan-musubi.safetensors --to comfyui -o wan-comfyui.safetensors
      loratools convert qwen3-moe-lora/ --to vllm-moe -o qwen3-moe-vllm/
      loratools convert text-lora/ --for-base qwen2.5-vl/ -o vl-lora/
      loratools convert vl-lora/ --remap-prefix model.language_model.=model. -o text-lora/
      loratools convert lokr-adapter/ --to peft --as-lora -o lora/
      loratools convert oft-adapter/ --to peft --as-lora --base model/ --rank 16 -o lora16/
    """
    from loratools.ops.convert import convert as run_convert

    out = get_output(ctx, json_mode)
    result = run_convert(
        adapter,
        to,
        output,
        base=base,
        kohya_prefix=kohya_prefix,
        include=include,
        exclude=exclude,
        overwrite=overwrite,
        trust_tensors=trust_tensors,
        allow_other_base=allow_other_base,
        dtype=None if dtype == "auto" else dtype,
        model=model,
        outtype=outtype,
        ollama=ollama,
        as_lora=as_lora,
        rank=rank,
        fro=fro,
        for_base=for_base,
        remap_prefix=remap_prefix,
    )
    out.result(result.to_dict(), _human)


def _human(d: dict[str, Any]) -> None:
    n = d["modules"]  # adapter modules, as info counts them (merge counts the base tensors they change)
    what = f"{n} adapter module{'' if n == 1 else 's'}"
    click.echo(f"wrote {d['output']} ({d['format']}, {what}, from {d['source_format']})")
    if d.get("modelfile"):
        click.echo(f"wrote {d['modelfile']} (ollama create NAME -f {d['modelfile']})")
    rb = d.get("rebound")
    if rb and rb.get("rewrites"):
        click.echo(f"rewrote {rb['renamed']} module path(s): {', '.join(rb['rewrites'])}")
    if rb and rb.get("tree_source"):
        click.echo(f"{rb['bound']} of {rb['modules']} modules bind to the {rb['tree_source']}")
    if d["folded_alpha"]:
        click.echo(f"folded rsLoRA's √r into alpha for {len(d['folded_alpha'])} module(s)")
    for module, reason in (d.get("skipped") or {}).items():
        click.echo(f"skipped {module}: {reason}")
    low = d.get("lowered")
    if low:
        from loratools.cli.output import render_table

        rows = [(m["name"], m["family"], m["rank"], m["exact_rank"], f"{m['relative_error']:.3g}", m["source"])
                for m in low["modules"]]
        click.echo(render_table(["module", "from", "rank", "exact rank", "rel. error", "via"], rows))
        click.echo(f"max relative error {low['max_relative_error']:.3g}")
        for key in low["kept_replacements"]:
            click.echo(f"kept {key} as a full tensor (pass --base to lower it)")
