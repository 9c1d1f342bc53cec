"""The bank file format's constants, shared by the writer (``bank.format``) and the reader
(``bank.reader``), which sits below it: ``Bank.save`` reads back what it writes with the reader,
so the reader cannot import ``format``."""
from __future__ import annotations

import re

FORMAT = "seqlora.bank"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
ID_PATTERN = re.compile(r"^[a-z0-9_-]+$")
ORTHOGONALITY_TOLERANCE = 1e-4
DEFAULT_EPS = 1e-8
# metadata: sha256 of the data region then of the ``concepts`` value, written by ``Bank.save``;
# when it matches, the recorded content hashes are vouched for (``reader.check_hashes``)
DIGEST_KEY = "data_sha256"
