"""ComfyUI nodes for SeqLoRA. Thin: they turn Comfy objects into the core's host protocol.

``comfy_host``, ``tokens`` and ``logic`` import ComfyUI lazily; ``v3`` declares the nodes with
ComfyUI's node API and is only imported inside ComfyUI (by the repository's ``__init__.py``).
"""
