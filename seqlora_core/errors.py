"""User-facing errors: one clear sentence, no traceback.

Every failure a user can cause (a corrupt bank, no usable images, a full layer, a bank made for
another base model) raises a subclass of :class:`SeqLoRAError`; hosts and the command line print
``str(error)`` and nothing else.
"""


class SeqLoRAError(Exception):
    """An error caused by the user's input, described in one sentence."""


class BankError(SeqLoRAError):
    """A bank file is missing, corrupt, or does not fit the request."""


class CapacityError(SeqLoRAError):
    """An adapted layer has no free width left for another concept."""


class InputError(SeqLoRAError):
    """Images, tokens or options given by the user cannot be used."""
