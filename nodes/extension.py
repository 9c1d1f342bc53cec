"""The pack as ComfyUI sees it: one ``ComfyExtension`` (ComfyUI's V3 extension API).

``on_load`` does everything that touches the running ComfyUI — registers ``models/seqlora`` as a
model folder, adds the ``/seqlora/concepts`` route and copies the example workflows' inputs into
ComfyUI's input folder where missing (``nodes.examples``) — and is idempotent. ComfyUI 0.3.64 calls
``get_node_list`` but never ``on_load``, so ``get_node_list`` makes sure it ran first; later
ComfyUI versions call ``on_load`` themselves.
"""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from . import operations

log = logging.getLogger("seqlora")


def register_routes() -> bool:
    """GET /seqlora/concepts[?bank=NAME]: bank file → its concept tokens (the box editor's picker).
    False when no server runs in this process (nothing to register on)."""
    from aiohttp import web
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False

    @server.routes.get("/seqlora/concepts")
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
        await self.on_load()
        from .node_defs import NODES

        return list(NODES)
