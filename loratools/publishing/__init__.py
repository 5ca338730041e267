"""Getting results out: atomic outputs and provenance (``publish``), the guard that replaces only a
previous loratools output (``output_guard``), ``hf://`` inputs and Hub errors (``hub``, ``hub_select``) and
model cards (``card``).

May import: ``loratools.errors``, ``files``, ``args``; ``card`` also reads adapters through ``formats``.
"""
