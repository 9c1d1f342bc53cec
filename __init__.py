"""ComfyUI entry point of the SeqLoRA node pack (clone this repository into ComfyUI/custom_nodes/).

ComfyUI imports this file as a package and calls :func:`comfy_entrypoint`, which returns the pack's
``ComfyExtension`` (``nodes/extension.py``): its ``on_load`` registers ``models/seqlora`` and the
``/seqlora/concepts`` route, its ``get_node_list`` returns the node classes. Importing this file
does nothing else — no ComfyUI module, no server, no folder — so tests, other tools and ComfyUI's
own scanners can import it anywhere.

The one thing done at import is putting the repository root on sys.path: ``seqlora_core``
(vendored here, host-agnostic) is imported as a top-level package by the nodes.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack as a ComfyExtension (imports ComfyUI only when called)."""
    from .nodes.extension import SeqLoRAExtension

    return SeqLoRAExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
