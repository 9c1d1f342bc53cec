"""Hosts: the protocol the method trains through (``protocol``), the standalone diffusers host, offline
loading of SD-1.5 base models, layer naming shared by every host, token injection and the shipped tokenizer data."""
