"""Adapter families beyond LoRA: one small module per family, one shared interface (:class:`FamilyModule`)."""

from __future__ import annotations

from .base import FamilyModule
from .boft import BOFTModule
from .ia3 import IA3Module
from .loha import LoHaModule
from .lokr import LoKrModule
from .oft import DiagOFTModule, OFTModule

#: families whose update is added (LoHa, LoKr): merge weights scale them linearly
ADDITIVE = ("loha", "lokr")

__all__ = [
    "ADDITIVE",
    "BOFTModule",
    "DiagOFTModule",
    "FamilyModule",
    "IA3Module",
    "LoHaModule",
    "LoKrModule",
    "OFTModule",
]
