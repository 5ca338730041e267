"""Base checkpoints: lazy readers, the streaming writer, and module-path -> tensor-key matching."""
