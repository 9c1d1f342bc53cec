"""Messages to ComfyUI's frontend (the live loss curve, the bank panel) over its websocket.

Without a running server (a script, a test) there is nobody to tell; training still reports to
ComfyUI's progress bar. Any failure to send is logged once per event name with its reason, never
raised (a lost chart point must not stop a training run) and never silently swallowed.
"""
from __future__ import annotations

import logging

log = logging.getLogger("seqlora")
_reported: set[str] = set()


def send(event: str, data: dict) -> bool:
    """Broadcast ``event`` with ``data``; True if it went out."""
    try:
        from server import PromptServer

        server = getattr(PromptServer, "instance", None)
        if server is None:
            raise RuntimeError("no ComfyUI server is running in this process")
        server.send_sync(event, data)
        return True
    except Exception as exc:  # noqa: BLE001 - reported once below, training goes on
        if event not in _reported:
            _reported.add(event)
            log.warning("SeqLoRA: could not send %s to the frontend (%s: %s); further failures of "
                        "this event are not logged", event, type(exc).__name__, exc)
        return False
