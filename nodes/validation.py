"""Checks of the nodes' widget values that need no model, run in ComfyUI's input validation.

ComfyUI calls a node's ``validate_inputs`` when a prompt is queued; a string it returns marks the
node red with that sentence before anything runs (instead of an execution error with a stack trace
after minutes of work). Each check here returns None when the value is fine, else one sentence.
A value that arrives through a link is None at validation time and is checked when the node runs.
"""
from __future__ import annotations

import json

from seqlora_core.errors import SeqLoRAError


def first_problem(*problems: str | None) -> bool | str:
    """What ``validate_inputs`` returns: True, or the first problem found."""
    return next((p for p in problems if p), True)


def _sentence(check, *args) -> str | None:
    try:
        check(*args)
    except SeqLoRAError as exc:
        return str(exc)
    return None


def token_problem(token: str | None) -> str | None:
    from seqlora_core.bank.format import token_to_id

    return None if token is None else _sentence(token_to_id, token)


def init_word_problem(word: str | None) -> str | None:
    if word is not None and len(word.split()) > 8:
        return "The init word should be a word or two close to the concept (cat, red mug), not a sentence."
    return None


def bank_name_problem(name: str | None, what: str = "Bank name") -> str | None:
    from .operations import check_bank_name

    return None if name is None else check_bank_name(name, what)


def lora_name_problem(name: str | None) -> str | None:
    return bank_name_problem(name, "LoRA name")


def selection_problem(text: str | None) -> str | None:
    """'all' or 'id[:strength], …' with valid ids and numeric strengths (the ids are checked
    against the bank when the node runs)."""
    from seqlora_core.bank.format import parse_selection_text

    return None if text is None else _sentence(parse_selection_text, text)


def regions_problem(text: str | None) -> str | None:
    from .regional import parse_regions_json

    return None if text is None else _sentence(parse_regions_json, text)


def parse_keypoints(text: str) -> dict:
    """OpenPose JSON → dict, or InputError with the expected shape."""
    from seqlora_core.errors import InputError
    from seqlora_core.sampling.keypose import people_keypoints

    try:
        data = json.loads(text)
        people_keypoints(data)
    except (ValueError, TypeError, AttributeError):
        raise InputError("Keypoints must be OpenPose JSON: {\"people\": [{\"pose_keypoints_2d\": [x, y, c, …]}]}.") from None
    return data


def keypoints_problem(text: str | None) -> str | None:
    return None if text is None else _sentence(parse_keypoints, text)
