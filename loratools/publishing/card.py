"""Model cards for what loratools publishes, with huggingface_hub's ``ModelCard``/``ModelCardData``.

Front matter: ``base_model`` (``--base-model``, else the adapter config, else the provenance record's
base input), ``library_name`` (``peft`` adapters, ``transformers`` merged checkpoints, ``diffusers``
pipelines and diffusers/kohya LoRA files, ``onnx`` exports) and tags including ``lora`` and
``loratools``. Body: rank, alpha, targets, parameter count, and how it was made (the provenance record
under the safetensors metadata key ``loratools``). An existing README a person wrote keeps its text; its
front matter only gains what is missing or empty (a ``base_model`` that is a local path counts as empty).
The empty template PEFT's ``save_pretrained`` writes (huggingface_hub's card template, every field
``[More Information Needed]``) is no one's text: the generated body replaces it, its front matter kept.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratools.errors import LoratoolsError, UsageError

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_LIBRARY_OF_FORMAT = {"peft": "peft", "diffusers": "diffusers", "kohya": "diffusers", "onnx_adapter": "onnx"}
_PLACEHOLDER = "[More Information Needed]"
#: what PEFT appends to the template: "### Framework versions" and "- PEFT 0.x.y" under it
_PEFT_LINES = re.compile(r"^(### Framework versions|- PEFT \S+)$")


@dataclass
class Artifact:
    """What a folder or file is, as far as its card is concerned."""

    kind: str  # adapter | checkpoint | pipeline | onnx
    library_name: str | None
    base_model: str | None = None
    rows: list[tuple[str, str]] = field(default_factory=list)
    provenance: dict[str, Any] | None = None
    pipeline_tag: str | None = None
    format: str | None = None


def hub_model_id(value: Any) -> str | None:
    """``value`` as a Hub model id (``hf://`` and ``@revision`` stripped), or None for local paths and junk."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    if text.startswith("hf://"):
        text = text[len("hf://") :]
    text = text.split("@", 1)[0]
    if text.count("/") > 1 or not _REPO_ID.match(text) or "--" in text or ".." in text or Path(value).exists():
        return None
    return text


def find_provenance(path: Path) -> dict[str, Any] | None:
    """The first loratools provenance record in the safetensors files at ``path`` (top level, then components)."""
    from loratools.files.safetensors_file import read_header
    from loratools.publishing.publish import read_provenance

    if path.is_file():
        candidates = [path]
    else:
        candidates = sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
    for f in candidates[:64]:
        try:
            _, metadata = read_header(f)
        except LoratoolsError:
            continue
        record = read_provenance(metadata)
        if record:
            return record
    return None


def _base_from_provenance(record: dict[str, Any] | None) -> str | None:
    inputs = (record or {}).get("inputs") or {}
    for key in sorted(inputs, key=lambda k: "base" not in k):
        items = inputs[key] if isinstance(inputs[key], list) else [inputs[key]]
        for item in items:
            if "base" in key and isinstance(item, dict):
                found = hub_model_id(item.get("repo_id")) or hub_model_id(item.get("path"))
                if found:
                    return found
    return None


def describe(path: str | Path) -> Artifact:
    """Classify ``path`` (adapter, merged checkpoint, diffusers pipeline, ONNX export) and gather card facts."""
    p = Path(path)
    record = find_provenance(p)
    if p.is_dir() and (p / "model_index.json").is_file():
        art = Artifact("pipeline", "diffusers", rows=[("kind", "diffusers pipeline")])
    elif p.is_dir() and any(p.glob("*.onnx")):
        art = Artifact("onnx", "onnx", rows=[("kind", "ONNX export")])
        art.rows += [("graphs", ", ".join(sorted(f.name for f in p.glob("*.onnx"))))]
    elif p.is_dir() and (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        art = _checkpoint(p)
    else:
        art = _adapter(p)
    art.provenance = record or art.provenance
    art.base_model = art.base_model or _base_from_provenance(art.provenance)
    return art


def _checkpoint(p: Path) -> Artifact:
    cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    art = Artifact("checkpoint", "transformers", rows=[("kind", "merged checkpoint")])
    arch = cfg.get("architectures") or []
    if arch:
        art.rows.append(("architecture", ", ".join(arch)))
    art.base_model = hub_model_id(cfg.get("_name_or_path"))
    return art


def _adapter(p: Path) -> Artifact:
    from loratools.formats.adapter_io import load_adapter
    from loratools.ops.info import summarize

    try:
        adapter = load_adapter(p)
    except LoratoolsError as exc:
        raise UsageError(
            f"{p}: not something loratools can describe ({exc.message})",
            hint="push an adapter, a merged checkpoint, a diffusers pipeline folder or an ONNX export",
        ) from None
    s = summarize(adapter)
    art = Artifact("adapter", _LIBRARY_OF_FORMAT.get(adapter.format or "", "peft"), format=adapter.format)
    art.base_model = hub_model_id(s.get("base_model"))
    art.provenance = s.get("provenance")
    art.pipeline_tag = _PIPELINE_TAGS.get(str(s.get("task_type") or "").upper())
    ranks, alphas = s.get("ranks") or [], s.get("alphas") or []
    art.rows = [
        ("kind", f"LoRA adapter ({adapter.format})"),
        ("rank", ", ".join(str(r) for r in ranks) or "-"),
        ("alpha", ", ".join(_number(a) for a in alphas) or "-"),
        ("targets", _listing(s.get("target_modules") or [])),
        ("modules", str(s.get("num_modules"))),
        ("parameters", f"{s.get('parameters'):,}"),
    ]
    flags = [name for name, on in (("rsLoRA", s.get("use_rslora")), ("DoRA", s.get("use_dora"))) if on]
    if flags:
        art.rows.append(("variants", ", ".join(flags)))
    if s.get("dtype"):
        art.rows.append(("dtype", str(s["dtype"])))
    return art


def _number(x: float) -> str:
    """A number for a card: 2.3333333333333335 reads 2.3333, 16.0 reads 16."""
    return f"{round(float(x), 4):g}"


def _shown(value: Any) -> str:
    """A parameter for a card: JSON, floats rounded like :func:`_number` (the file's record stays exact)."""
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return json.dumps(value)


def _merged(record: dict[str, Any] | None) -> str:
    """``a LoRA adapter`` or ``3 LoRA adapters``: what the provenance record says was merged."""
    adapters = ((record or {}).get("inputs") or {}).get("adapters")
    n = len(adapters) if isinstance(adapters, list) else 1
    return "a LoRA adapter" if n <= 1 else f"{n} LoRA adapters"


def _listing(items: list[str], limit: int = 12) -> str:
    if not items:
        return "-"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def front_matter(art: Artifact, base_model: str | None = None) -> dict[str, Any]:
    """The metadata loratools puts on a card (before merging with an existing README)."""
    base = hub_model_id(base_model) if base_model else art.base_model
    tags = ["lora", "loratools"]
    if art.kind == "adapter" and base:
        tags.append(f"base_model:adapter:{base}")
    data: dict[str, Any] = {"library_name": art.library_name, "tags": tags}
    if base:
        data["base_model"] = base
    if art.pipeline_tag:
        data["pipeline_tag"] = art.pipeline_tag
    return data


def _how_made(record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    lines = ["", "## How it was made", ""]
    op = record.get("operation", "?")
    lines.append(f"`loratools {op}` (loratools {record.get('loratools_version', '?')}).")
    params = {k: v for k, v in (record.get("parameters") or {}).items() if v not in (None, [], {}, "")}
    if params:
        lines += ["", "Parameters:", ""] + [f"- `{k}`: `{_shown(v)}`" for k, v in sorted(params.items())]
    inputs = record.get("inputs") or {}
    if inputs:
        lines += ["", "Inputs:", ""]
        for name, value in inputs.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"- {name}: {_describe_input(item)}")
    return lines


def _describe_input(item: Any) -> str:
    if not isinstance(item, dict):
        return f"`{item}`"
    if item.get("repo_id"):
        rev = str(item.get("revision") or "")
        where = f"/{item['path']}" if item.get("path") else ""
        return f"[{item['repo_id']}](https://huggingface.co/{item['repo_id']}){where} at `{rev[:12] or 'main'}`"
    files = item.get("files") or []
    digests = [f"{f.get('path')} (sha256 {str(f.get('sha256') or f.get('sha256_header') or '')[:12]})" for f in files]
    name = Path(str(item.get("path") or item.get("source") or "?")).name
    return f"local `{name}`" + (f": {', '.join(digests[:4])}" if digests else "")


def body(art: Artifact, repo_id: str, base_model: str | None) -> str:
    """The Markdown body of a fresh card."""
    name = repo_id.rsplit("/", 1)[-1]
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its base model"
    what = {
        "adapter": f"A LoRA adapter for {base_link}",
        "checkpoint": f"{base_link[0].upper() + base_link[1:]} with {_merged(art.provenance)} merged into its weights",
        "pipeline": f"A diffusers pipeline built on {base_link}",
        "onnx": f"An ONNX export of {base_link}",
    }[art.kind]
    lines = ["", f"# {name}", "", f"{what}, published with [loratools](https://pypi.org/project/loratools/).", ""]
    lines += ["## Details", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in art.rows]
    lines += _how_made(art.provenance)
    lines += ["", "## Use it", "", "```python"] + _usage(art, repo_id, base_model) + ["```", ""]
    return "\n".join(lines)


def _usage(art: Artifact, repo_id: str, base_model: str | None) -> list[str]:
    base = base_model or "BASE_MODEL_ID"
    if art.kind == "adapter" and art.library_name == "peft":
        return [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo_id}")',
        ]
    if art.kind == "adapter":
        return [
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}")',
            f'pipe.load_lora_weights("{repo_id}")',
        ]
    if art.kind == "pipeline":
        return ["from diffusers import DiffusionPipeline", "", f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")']
    if art.kind == "onnx":
        graph = next((v.split(", ")[0] for k, v in art.rows if k == "graphs"), "model.onnx")
        return [
            "import onnxruntime as ort",
            "from huggingface_hub import snapshot_download",
            "",
            f'folder = snapshot_download("{repo_id}")',
            f'session = ort.InferenceSession(f"{{folder}}/{graph}")',
        ]
    return [
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
    ]


def _content_lines(text: str) -> list[str]:
    """The lines of a card body that say something: comments, blank and placeholder lines dropped."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [s for s in (line.strip() for line in text.splitlines()) if s and _PLACEHOLDER not in s]


def is_untouched_template(readme: str) -> bool:
    """True when ``readme`` is huggingface_hub's empty card template (what PEFT's save_pretrained writes):
    placeholders left, and no line that the template does not hold — one filled field makes it a person's.
    """
    from huggingface_hub import ModelCard, ModelCardData

    text = ModelCard(readme, ignore_metadata_errors=True).text
    if _PLACEHOLDER not in text:
        return False
    stock = set(_content_lines(ModelCard.from_template(ModelCardData()).text))
    return all(line in stock or _PEFT_LINES.match(line) for line in _content_lines(text))


def build_card(
    path: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    existing: str | None = None,
    overwrite: bool = False,
) -> ModelCard:
    """The model card to publish for ``path`` as ``repo_id``.

    ``existing`` is the text of a README.md already there: unless ``overwrite``, its text is kept and its
    front matter gains only what is missing or empty — except an untouched template
    (:func:`is_untouched_template`), whose body the generated one replaces. ``base_model`` (a Hub id)
    wins over what is found.
    """
    from huggingface_hub import ModelCard, ModelCardData

    if base_model is not None and hub_model_id(base_model) is None:
        raise UsageError(f"--base-model {base_model!r} is not a Hub model id", hint="write ORG/NAME")
    art = describe(path)
    ours = front_matter(art, base_model)
    if existing is None or overwrite:
        card = ModelCard(f"---\n{ModelCardData(**ours).to_yaml()}\n---\n{body(art, repo_id, ours.get('base_model'))}")
        return card
    card = ModelCard(existing, ignore_metadata_errors=True)
    data = card.data
    for key, value in ours.items():
        current = data.get(key)
        if key == "tags":
            kept = [t for t in (current or []) if not (isinstance(t, str) and t.endswith(":"))]  # "base_model:adapter:"
            data[key] = kept + [t for t in value if t not in kept]
        elif key == "base_model":
            if not _valid_bases(current) or base_model:
                data[key] = value
        elif current in (None, "", [], {}):
            data[key] = value
    if data.get("base_model") is not None and not _valid_bases(data.get("base_model")):
        data.pop("base_model")  # a local path: the Hub would refuse the card
    if is_untouched_template(existing):
        return ModelCard(f"---\n{data.to_yaml()}\n---\n{body(art, repo_id, data.get('base_model'))}")
    return card


def _valid_bases(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(hub_model_id(v) for v in values)
