"""Bank names a user types (a ComfyUI widget, an A1111 ``<seqlora:BANK:…>`` tag): files inside the
host's bank folder, never a path that leaves it.

A prompt or a shared workflow is text from someone else; if its bank name were joined into a path
unchecked, ``../../x``, ``/abs/x`` or ``\\\\server\\share\\x`` would load any ``.safetensors`` file
the host can read. The rule is the one ComfyUI's Save Basis Bank always used for names (letters,
digits, spaces and ``_ . ( ) -``), applied to each part of a ``/``-separated name so banks in
sub-folders of the bank folder (which ComfyUI's picker lists as ``sub/name.safetensors``) still load.
Pure: both hosts share it, and it imports no host.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError

SAFE_NAME = re.compile(r"^[A-Za-z0-9 _.()-]+$")
SUFFIX = ".safetensors"


def check_bank_name(name: str, what: str = "Bank name") -> str | None:
    """None if ``name`` can be a bank file name (no folder part), else the one sentence saying why not
    (``what``: how the sentence names it, e.g. "LoRA name" for Export LoRA). A name starting with
    a dot is refused too: ``..`` or ``.hidden`` would write a hidden file (``...safetensors``) that
    a file browser hides and that nobody meant."""
    stem = name.strip()
    if stem.endswith(SUFFIX):
        stem = stem[: -len(SUFFIX)]
    if not stem or not SAFE_NAME.match(stem):
        return f"{what} '{name}' may only use letters, digits, spaces and _ . ( ) -."
    if stem.startswith("."):
        return f"{what} '{name}' may not start with a dot (that makes a hidden file)."
    return None


def bank_name_problem(name: str) -> str | None:
    """None if ``name`` (``bank``, ``bank.safetensors`` or ``sub/bank``) names a file inside a bank
    folder, else why not: each ``/``-separated part follows ``check_bank_name`` and none is ``.``
    or ``..``; so no absolute, drive, UNC or backslash path and no way out of the folder."""
    shown = name.encode("unicode_escape").decode("ascii")[:80]
    parts = name.split("/")
    stem = parts[-1][: -len(SUFFIX)] if parts[-1].endswith(SUFFIX) else parts[-1]
    if any(p in ("", ".", "..") or SAFE_NAME.match(p) is None for p in parts) or not stem.strip():
        return (f"Bank name '{shown}' must be a file name in the bank folder (letters, digits, spaces and "
                "_ . ( ) -, sub-folders with /), not a path that leaves it.")
    return None


def bank_file_in(folder: str | Path, name: str) -> Path:
    """The file a bank name names inside ``folder`` (``.safetensors`` added when missing); an
    InputError when the name would leave the folder."""
    problem = bank_name_problem(name)
    if problem:
        raise InputError(problem)
    return Path(folder) / (name if name.endswith(SUFFIX) else name + SUFFIX)
