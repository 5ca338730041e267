"""kohya / sd-scripts single files: the format (``format``), ``ss_*`` metadata (``meta``), SGM
(SDXL single-file) names (``sgm``) and LyCORIS LoHa/LoKr/diag-OFT tensors (``lycoris``).
"""
