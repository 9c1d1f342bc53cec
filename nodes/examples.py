"""The example workflows' inputs, put where a ComfyUI user expects them (issue 23).

The pack ships small example inputs in ``example_inputs/`` (``seqlora_chelsea.jpg`` for Load Image,
the folder ``seqlora_coffee/`` for Load Image Folder, ``seqlora_sketch.png``). When ComfyUI loads
the pack they are copied into its input folder, each file only if no file of that name is there:
nothing of the user's is ever replaced, and a file the user deleted comes back at the next start
(the example workflows name it). The ``seqlora_`` prefix keeps them apart from the user's files.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "example_inputs"
SUFFIXES = {".jpg", ".jpeg", ".png"}
log = logging.getLogger("seqlora")


def example_files() -> list[Path]:
    """The shipped example inputs, relative to ``example_inputs/``."""
    return sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def copy_examples(input_dir: str | Path) -> list[Path]:
    """Copy the example inputs missing from ``input_dir``; returns those copied. A failure (a
    read-only folder) is logged once, never raised: the pack works without its examples."""
    copied = []
    for rel in example_files():
        target = Path(input_dir) / rel
        if target.exists():
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(EXAMPLES / rel, target)
            copied.append(rel)
        except OSError as exc:
            log.warning("SeqLoRA: could not copy the example inputs into %s (%s)", input_dir, exc)
            break
    if copied:
        log.info("SeqLoRA: copied %d example input(s) into %s", len(copied), input_dir)
    return copied
