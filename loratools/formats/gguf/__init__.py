"""GGUF adapters for llama.cpp / Ollama / LM Studio: the format (``format``), HF <-> GGUF tensor
names per architecture (``names``), the tensor plan (``plan``) and converter row rewrites (``rewrites``).
"""
