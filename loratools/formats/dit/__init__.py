"""Diffusion-transformer LoRAs (Flux first): which family and trainer layout a file is (:mod:`.layouts`), each
family's name table between its original layout and diffusers' (:mod:`.flux`), and the readers/writers of the
original-layout files (:mod:`.flux_io`, :mod:`.format`: kohya/musubi, ComfyUI, BFL). diffusers-layout files
(``transformer.`` keys) are read by ``formats/diffusers.py``; both hand their modules to :func:`.flux_io.place`.
"""
