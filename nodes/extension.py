"""The pack as ComfyUI sees it: one ``ComfyExtension`` (ComfyUI's V3 extension API).

``on_load`` does everything that touches the running ComfyUI — registers ``models/seqlora`` as a
model folder, adds the ``/seqlora/concepts`` route and copies the example workflows' inputs into
ComfyUI's input folder where missing (``nodes.examples``) — and is idempotent. ComfyUI 0.3.64 calls
``get_node_list`` but never ``on_load``, so ``get_node_list`` makes sure it ran first; later
ComfyUI versions call ``on_load`` themselves.

A second copy of the pack in ``custom_nodes`` (a renamed clone, a backup folder) is imported by
ComfyUI as another package with its own classes. Its route would be a second GET on
``/seqlora/concepts``, which aiohttp refuses when the server adds its routes, so ComfyUI would
not start; its nodes would replace the first copy's under the same ids. So the second copy adds
no route and no node, and says so in one warning naming both folders.
"""
from __future__ import annotations

import inspect
import logging
import os
import sys

from comfy_api.latest import ComfyExtension, io

from . import operations

log = logging.getLogger("seqlora")


CONCEPTS_ROUTE = "/seqlora/concepts"


def other_copy() -> str | None:
    """The folder of another copy of the pack whose nodes ComfyUI has already registered, or None.
    ComfyUI's registry is its top-level ``nodes`` module (``NODE_CLASS_MAPPINGS``)."""
    from .node_defs import TrainConcept

    registered = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", {}).get("SeqLoRATrainConcept")
    if registered is None or registered is TrainConcept:
        return None
    return os.path.dirname(os.path.dirname(inspect.getfile(registered)))


def register_routes() -> bool:
    """GET /seqlora/concepts[?bank=NAME]: bank file → its concept tokens (the box editor's picker).
    False when no server runs in this process (nothing to register on)."""
    from aiohttp import web
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    if any(getattr(route, "path", None) == CONCEPTS_ROUTE for route in server.routes):
        return True  # another copy of the pack registered it (aiohttp refuses a path's GET twice)

    @server.routes.get(CONCEPTS_ROUTE)
    async def concepts(request):
        return web.json_response(operations.bank_tokens(request.query.get("bank") or None))

    return True


def _copy_examples() -> None:
    import folder_paths

    from .examples import copy_examples

    copy_examples(folder_paths.get_input_directory())


class SeqLoRAExtension(ComfyExtension):
    loaded = False

    async def on_load(self) -> None:
        if SeqLoRAExtension.loaded:
            return
        operations.register_folder()
        _copy_examples()
        if not register_routes():
            log.info("SeqLoRA: no ComfyUI server in this process; /seqlora/concepts is not served")
        SeqLoRAExtension.loaded = True

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        other = other_copy()
        if other is not None:
            here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            log.warning("SeqLoRA: another copy of the pack is already loaded from %s; this copy (%s) adds "
                        "no node. Remove one of the two folders from custom_nodes.", other, here)
            return []
        await self.on_load()
        from .node_defs import NODES

        return list(NODES)
