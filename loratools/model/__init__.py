"""The canonical adapter model and its exact algebra: ``Adapter`` / ``LoraModule`` (``adapter``), low-rank
factor math (``lowrank``), tied weights, trainable tokens, aLoRA, the config-vs-tensor rank rule
(``ambiguity``) and the finite-value checks.

May import: ``loratools.errors``, ``files``, ``args`` and ``families``. Never a file format, a checkpoint
reader, an operation, the Hub or the CLI: every reader and writer converts to and from this model.
"""
