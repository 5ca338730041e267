"""Operations: one module per verb, pure functions over the adapter model, readers and writers."""
