"""PEFT adapter folders: the format (``format``), its ``adapter_config.json`` (``config``), the LoRA
family variants LoHa/LoKr/OFT/BOFT/IA3 (``families``) and diffusers-pipeline adapters (``pipeline``).
"""
