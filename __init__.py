"""ComfyUI entry point of the SeqLoRA node pack (clone this repository into ComfyUI/custom_nodes/).

ComfyUI imports this file as a package; ``seqlora_core`` (vendored here, host-agnostic) is
imported as a top-level package, so the repository root goes on sys.path. Imported anywhere
else (pytest treats the repository root as a package), it exports no nodes.
"""
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

WEB_DIRECTORY = "./js"

if importlib.util.find_spec("comfy_api") is not None:  # inside ComfyUI
    from .nodes.node_defs import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
