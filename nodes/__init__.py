"""ComfyUI nodes for SeqLoRA. Thin: they turn Comfy objects into the core's host protocol.

``comfy_host`` (the host adapter), ``concept_tokenizer`` and ``operations`` (what each node does)
import ComfyUI lazily; ``node_defs`` declares the nodes with ComfyUI's V3 node API and is only
imported inside ComfyUI (by the repository's ``__init__.py``).
"""
