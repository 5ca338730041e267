"""Findings: one problem each (severity, module, stable code, message naming file and tensor), and the
report that collects them. Shared by the adapter checks, the base checks and the serving rules."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loratools.errors import LoratoolsError

Severity = Literal["error", "warning"]


@dataclass
class Finding:
    """One problem: ``severity`` ('error' | 'warning'), the module it concerns (or None), a stable
    ``code`` for scripts, and a message naming the file and tensor where there is one."""

    severity: Severity
    module: str | None
    code: str
    message: str
    hint: str | None = None
    file: str | None = None
    tensor: str | None = None
    index: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidationReport:
    """The findings of one ``validate`` run. ``ok``: no errors; ``usable``: the input could be read."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    format: str | None = None
    base: str | None = None
    modules_checked: int = 0
    usable: bool = True
    scan: dict[str, Any] | None = None
    #: a quantized --base: scheme, settings, quantized tensors and (with --reference) per-module gaps
    quantized_base: dict[str, Any] | None = None
    #: with --base: how the modules bind (module tree vs loratools' merge, prefix rewrites; ops/bind.py)
    binding: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.usable and not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def exit_code(self) -> int:
        """0 ok (warnings allowed), 1 error findings, 2 input unusable."""
        return 2 if not self.usable else (1 if self.errors else 0)

    def add(self, severity: Severity, module: str | None, code: str, message: str, **kw: Any) -> None:
        self.findings.append(Finding(severity, module, code, message, **kw))

    def unusable(self, exc: LoratoolsError, code: str) -> ValidationReport:
        self.usable = False
        self.add("error", None, code, exc.message, hint=exc.hint, file=str(exc.path) if exc.path else None)
        return self

    def to_dict(self) -> dict[str, Any]:
        scan = {"scan": self.scan} if self.scan is not None else {}
        return {
            "path": self.path,
            "format": self.format,
            "base": self.base,
            "ok": self.ok,
            "usable": self.usable,
            "modules_checked": self.modules_checked,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [f.to_dict() for f in self.findings],
            **scan,
            **({"quantized_base": self.quantized_base} if self.quantized_base is not None else {}),
            **({"binding": self.binding} if self.binding is not None else {}),
        }
