"""Bank files: the concepts' factors and tokens on disk (``format``), export to standard LoRA files
(``export``), atomic writes (``atomic``) and the base-model fingerprint a bank is checked against."""
