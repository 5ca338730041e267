"""Adapter families beyond LoRA: one small module per family, one shared interface (:class:`FamilyModule`)."""

from __future__ import annotations

from loratools.families.base import FamilyModule
from loratools.families.boft import BOFTModule
from loratools.families.ia3 import IA3Module
from loratools.families.loha import LoHaModule
from loratools.families.lokr import LoKrModule
from loratools.families.oft import DiagOFTModule, OFTModule

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
