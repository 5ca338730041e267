"""Argument checks the library applies as well as the CLI: numbers (``numeric_args``), ``--include`` /
``--exclude`` filters (``filters``) and ``--device`` (``devices``) — one rule and one message each.

May import: ``loratools.errors`` only.
"""
