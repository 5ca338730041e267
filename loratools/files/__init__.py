"""Checked low-level file readers shared by adapter formats and base checkpoints: safetensors headers
(bounded, overlap-free), pickles read without running code, JSON with size and depth limits.

May import: ``loratools.errors`` only.
"""
