"""Will this adapter bind? Its module paths against the names a base's consumers look them up by.

Two consumers, two sets of names. loratools' own ``merge`` resolves a module against the checkpoint's
*on-disk* tensor names, leniently (wrapper components such as ``model.`` and ``language_model.`` may differ,
:mod:`loratools.checkpoint.keymap`). PEFT (``PeftModel.from_pretrained``) and the servers (vLLM, SGLang) bind
to the *module tree* the model class builds in memory, by exact path; a path that is not there is a
"missing adapter keys" warning in PEFT and base-model output in vLLM. For most models both are the same
names. For transformers 5 vision-language wrappers they are not: ``save_pretrained`` writes Qwen2/2.5-VL as
``model.layers…`` and Gemma 3 / Mistral 3 / Llava as ``language_model.model.layers…``, while the tree is
``model.language_model.layers…`` — so an adapter trained on the text-only model (``model.layers…``) merges
by disk names but binds nothing in PEFT or vLLM, and one saved from the wrapper binds nothing on the text
model. The module tree of such a wrapper is built from its ``config.json`` on the meta device (no weights
are read); any other base's tree is its on-disk names.

Where paths do not bind, :func:`prefix_rewrites` finds the prefix rewrites (``model.`` ->
``model.language_model.``) that make them: each unbound path is matched to tree paths ending with its
longest possible tail (two components at least), candidates vote, and rewrites are taken greedily by
votes, one new prefix per old prefix, never two modules onto one, never onto a weight of another shape.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loratools.checkpoint.reader import CheckpointReader
    from loratools.model.adapter import Adapter

#: config keys of a multimodal wrapper (its disk names may differ from its module tree)
_WRAPPER_KEYS = ("text_config", "vision_config", "audio_config")


@dataclass(frozen=True)
class PrefixRewrite:
    """``old`` -> ``new`` at the start of a module path (both end with '.', or are empty)."""

    old: str
    new: str

    def __str__(self) -> str:
        return f"{self.old or '(none)'} -> {self.new or '(none)'}"

    def apply(self, name: str) -> str | None:
        return self.new + name[len(self.old) :] if name.startswith(self.old) else None

    @classmethod
    def parse(cls, spec: str) -> PrefixRewrite:
        """``OLD=NEW`` as the user writes it (``model.=model.language_model.``); a dot is added where missing."""
        from loratools.errors import UsageError

        old, eq, new = spec.partition("=")
        if not eq or old == new:
            raise UsageError(f"--remap-prefix {spec!r}: write OLD=NEW, for example model.=model.language_model.")
        return cls(*(p if not p or p.endswith(".") else p + "." for p in (old.strip(), new.strip())))


@dataclass
class ModuleTree:
    """The module paths a consumer binds to (modules holding a weight of two or more dimensions), their
    weight shapes, and where they came from (``module tree of Class`` or ``on-disk names``)."""

    shapes: dict[str, tuple[int, ...]]
    source: str
    wrapper: bool = False


def module_tree(reader: CheckpointReader) -> ModuleTree:
    """The names PEFT and servers bind to for the base of ``reader``: a multimodal wrapper's module tree
    built on the meta device by transformers; else (or where it cannot be built) its on-disk names."""
    cfg = reader.config if isinstance(getattr(reader, "config", None), dict) else None
    note = ""
    if cfg is not None and any(isinstance(cfg.get(k), dict) for k in _WRAPPER_KEYS):
        arch = (cfg.get("architectures") or [None])[0]
        try:
            return ModuleTree(_meta_tree(reader.root), f"module tree of {arch}", wrapper=True)
        except Exception as exc:  # noqa: BLE001 - any failure to build leaves the disk names (said so)
            note = f" (transformers could not build {arch}: {type(exc).__name__})"
    shapes = {}
    for key in reader.keys():
        if key.endswith(".weight"):
            shape = tuple(reader.info(key).shape)
            if len(shape) >= 2:
                shapes[key[: -len(".weight")]] = shape
    return ModuleTree(shapes, "on-disk names" + note)


def _meta_tree(root: Any) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(root))
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise LookupError("no such transformers class")
    with torch.device("meta"):
        model = cls._from_config(config)
    return {
        name: tuple(w.shape)
        for name, mod in model.named_modules()
        if isinstance(w := getattr(mod, "weight", None), torch.Tensor) and w.dim() >= 2
    }


def _fits(module: Any, shape: tuple[int, ...] | None) -> bool:
    from loratools.checkpoint.keymap import same_matrix

    want = getattr(module, "weight_shape", None)
    if shape is None or not want:
        return True
    want = tuple(want)
    return same_matrix(want, shape) or want == shape[::-1]


def prefix_rewrites(
    modules: dict[str, Any], shapes: dict[str, tuple[int, ...]], bound: set[str] | None = None
) -> dict[str, str]:
    """``{adapter path: tree path}`` for the unbound ``modules`` that prefix rewrites make bind (see the
    module docstring); :func:`rewrites_of` names the rewrites."""
    tails: dict[str, list[str]] = {}
    for t in shapes:
        parts = t.split(".")
        for i in range(len(parts) - 1):  # tails of two components or more
            tails.setdefault(".".join(parts[i:]), []).append(".".join(parts[:i]) + "." if i else "")
    taken = set(bound if bound is not None else (n for n in modules if n in shapes))
    todo = [n for n in modules if n not in shapes]
    votes: Counter[PrefixRewrite] = Counter()
    for n in todo:
        parts = n.split(".")
        for i in range(len(parts) - 1):
            heads = tails.get(".".join(parts[i:]))
            if heads:
                old = ".".join(parts[:i]) + "." if i else ""
                votes.update(PrefixRewrite(old, h) for h in set(heads) if h != old)
                break
    found: dict[str, str] = {}
    used_old: set[str] = set()
    for rw, _ in votes.most_common():
        if rw.old in used_old:
            continue
        hits = {n: t for n in todo if n not in found and (t := rw.apply(n)) is not None and t in shapes}
        if not hits or any(t in taken for t in hits.values()) or len(set(hits.values())) < len(hits):
            continue
        if not all(_fits(modules[n], shapes[t]) for n, t in hits.items()):
            continue
        used_old.add(rw.old)
        taken.update(hits.values())
        found.update(hits)
    return found


def disk_fix(
    module: str, reader: CheckpointReader, shape: tuple[int, ...] | None = None
) -> tuple[PrefixRewrite, str] | None:
    """The one prefix rewrite that gives ``module`` a weight (of ``shape``, when known) under the checkpoint's
    on-disk names, and the name it becomes; None when there is none or more than one (a vision tower's
    ``q_proj`` beside the text's)."""
    from types import SimpleNamespace

    want = SimpleNamespace(weight_shape=shape)
    shapes = {k[: -len(".weight")]: tuple(reader.info(k).shape) for k in reader.keys() if k.endswith(".weight")}
    parts = module.split(".")
    for i in range(len(parts) - 1):
        tail = ".".join(parts[i:])
        heads = {
            t[: len(t) - len(tail)] for t in shapes if (t == tail or t.endswith("." + tail)) and _fits(want, shapes[t])
        }
        if heads:
            if len(heads) > 1:
                return None
            rw = PrefixRewrite(".".join(parts[:i]) + "." if i else "", heads.pop())
            return rw, rw.new + tail
    return None


def rewrites_of(mapping: dict[str, str]) -> list[PrefixRewrite]:
    """The prefix rewrites a ``{old path: new path}`` mapping consists of, most modules first."""
    count: Counter[PrefixRewrite] = Counter()
    for a, b in mapping.items():
        pa, pb = a.split("."), b.split(".")
        k = 0
        while k < min(len(pa), len(pb)) and pa[-1 - k] == pb[-1 - k]:
            k += 1
        count[PrefixRewrite(*(".".join(p[: len(p) - k]) + "." if len(p) > k else "" for p in (pa, pb)))] += 1
    return [rw for rw, _ in count.most_common()]


@dataclass
class BindReport:
    """How an adapter's modules bind to one base, for each consumer."""

    base: str
    tree_source: str
    modules: int
    #: modules found by the base's module tree (PEFT, vLLM, SGLang): exact paths
    bound: int
    #: modules loratools' merge resolves by the checkpoint's on-disk names
    merge_bound: int
    #: the prefix rewrites that make more bind, and how many bind after them
    rewrites: list[str] = field(default_factory=list)
    bound_after: int = 0
    first_unbound: str | None = None
    #: the tree path the first unbound module becomes under the rewrites
    first_target: str | None = None
    #: tree modules the adapter's target_modules match that it holds no tensors for (a vision tower)
    extra_targets: list[str] = field(default_factory=list)
    mapping: dict[str, str] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mapping")
        return d


def _judged(adapter: Adapter) -> dict[str, Any]:
    """The modules a binding report speaks for: not expert slices (their names are parameters)."""
    return {n: m for n, m in adapter.modules.items() if not hasattr(m, "num_experts")}


def bind_report(adapter: Adapter, reader: CheckpointReader, tree: ModuleTree | None = None) -> BindReport:
    """How ``adapter``'s modules bind to the base of ``reader``: in its module tree, by loratools' merge,
    and after the prefix rewrites :func:`prefix_rewrites` finds."""
    from loratools.checkpoint.keymap import KeyMatcher, WeightTargets

    tree = tree or module_tree(reader)
    modules = _judged(adapter)
    bound = {n for n in modules if n in tree.shapes}
    matcher, target = KeyMatcher(reader.keys()), WeightTargets(reader)
    merge_bound = sum(1 for n in modules if matcher.tensor_key(n) is not None or target(n)[1] is not None)
    mapping = prefix_rewrites(modules, tree.shapes, bound)
    unbound = sorted(set(modules) - bound)
    first = next((n for n in unbound if n in mapping), unbound[0] if unbound else None)
    report = BindReport(
        base=str(reader.root), tree_source=tree.source, modules=len(modules), bound=len(bound),
        merge_bound=merge_bound, rewrites=[str(r) for r in rewrites_of(mapping)],
        bound_after=len(bound) + len(mapping), first_unbound=first, first_target=mapping.get(first or ""),
        mapping=mapping,
    )  # fmt: skip
    report.extra_targets = extra_targets(adapter, tree, set(bound) | set(mapping.values()))
    return report


def extra_targets(adapter: Adapter, tree: ModuleTree, held: set[str]) -> list[str]:
    """Tree modules PEFT would wrap by the adapter's own ``target_modules`` (a list of names or dotted
    suffixes, or a regex) that hold no tensor of it: on a wrapper, bare ``q_proj`` also matches the vision
    tower's. Loading, PEFT creates LoRA layers there at zero and warns of missing keys."""
    import re

    cfg = adapter.meta.get("config") if adapter.format == "peft" else None
    if not isinstance(cfg, dict) or not tree.wrapper or any(cfg.get(k) for k in ("layers_to_transform",)):
        return []
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error:
            return []
        wraps = [t for t in tree.shapes if pattern.fullmatch(t)]
    elif isinstance(targets, list) and targets:
        names = [str(t) for t in targets]
        wraps = [t for t in tree.shapes if any(t == s or t.endswith("." + s) for s in names)]
    else:
        return []
    return sorted(t for t in wraps if t not in held)


def rename(adapter: Adapter, mapping: dict[str, str], *, full_paths: bool = False) -> Adapter:
    """``adapter`` with module paths (and its full tensors' module parts) renamed by ``mapping``; with
    ``full_paths`` (or any rename) the PEFT writer lists full module paths as target_modules."""
    from dataclasses import replace

    modules = {mapping.get(n, n): m for n, m in adapter.modules.items()}
    replacements = {}
    for key, t in adapter.replacements.items():
        mod, _, suffix = key.rpartition(".")
        replacements[f"{mapping.get(mod, mod)}.{suffix}" if mod else key] = t
    meta = dict(adapter.meta)
    if mapping or full_paths:
        meta["config_modules"] = None  # the user's short names would wrap other modules too
    return replace(adapter, modules=modules, replacements=replacements, meta=meta)


def explicit_mapping(adapter: Adapter, rewrites: list[PrefixRewrite]) -> dict[str, str]:
    """``{path: new path}`` under the user's ``--remap-prefix`` rules (the longest matching OLD wins)."""
    ordered = sorted(rewrites, key=lambda r: -len(r.old))
    names = list(adapter.modules) + [k.rpartition(".")[0] for k in adapter.replacements]
    mapping = {}
    for n in names:
        for rw in ordered:
            new = rw.apply(n)
            if new is not None:
                if new != n:
                    mapping[n] = new
                break
    return mapping


def fix_hint(adapter_label: str, base: str, report: BindReport) -> str:
    """The one-command fix for a report whose rewrites make modules bind."""
    return (
        f"rewrite the module paths ({', '.join(report.rewrites)}): loratools convert {adapter_label} "
        f"--for-base {base} -o FIXED"
    )


def bind_to(
    adapter: Adapter, for_base: Any = None, remap: list[str] | tuple[str, ...] = ()
) -> tuple[Adapter, dict[str, Any]]:
    """``adapter`` renamed by the user's ``remap`` rules (``OLD=NEW``), then, with ``for_base``, by the prefix
    rewrites that make every module bind to that base's module tree (PEFT's and vLLM's names). A
    ``ValidationError`` when modules still do not bind there; the PEFT writer then lists full module paths.
    Returns the adapter and what was done (``rewrites``, ``renamed``, ``bound``/``modules``, ``tree_source``)."""
    from loratools.errors import ValidationError

    mapping = explicit_mapping(adapter, [PrefixRewrite.parse(s) for s in remap])
    out = rename(adapter, mapping)
    info: dict[str, Any] = {"renamed": len(mapping)}
    if for_base is not None:
        from loratools.checkpoint.reader import CheckpointReader, open_checkpoint

        reader = for_base if isinstance(for_base, CheckpointReader) else open_checkpoint(for_base)
        try:
            tree = module_tree(reader)
            report = bind_report(out, reader, tree)
        finally:
            if reader is not for_base:
                reader.close()
        found = dict(report.mapping)
        for key in out.replacements:  # full tensors (modules_to_save) follow the same rewrites
            mod = key.rpartition(".")[0]
            if mod and mod not in tree.shapes:
                for rw in rewrites_of(report.mapping):
                    if (new := rw.apply(mod)) is not None and new in tree.shapes:
                        found[mod] = new
                        break
        out = rename(out, found, full_paths=bool(report.extra_targets))
        mapping = {a: found.get(b, b) for a, b in mapping.items()} | {
            a: b for a, b in found.items() if a not in mapping.values()
        }
        info["renamed"] = len(mapping)
        unbound = sorted(n for n in _judged(out) if n not in tree.shapes)
        if unbound:
            raise ValidationError(
                f"{len(unbound)} of {report.modules} modules do not bind to the {tree.source} of {for_base} "
                f"under any prefix rewrite (first: {unbound[0]}): the adapter may be for another model",
                hint="name the rewrite with --remap-prefix OLD=NEW, or leave those modules out with --exclude REGEX",
            )
        info.update(bound=report.modules, modules=report.modules, tree_source=tree.source,
                    full_target_paths=bool(report.extra_targets))  # fmt: skip
    info["rewrites"] = [str(r) for r in rewrites_of(mapping)]
    return out, info
