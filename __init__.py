"""ComfyUI entry point of the SeqLoRA node pack (clone this repository into ComfyUI/custom_nodes/).

ComfyUI imports this file as a package; the nodes need the repository root on sys.path so that
``seqlora_core`` (vendored here, host-agnostic) and ``nodes`` import as top-level packages.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from .nodes.v3 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
