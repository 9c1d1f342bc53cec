"""A lease granted and written to its own file, under the bank's lock: what the CLI and the tab call.

Its own module, above ``lock`` (``bank.lease`` holds the Lease record and the maths of granting,
and ``bank.format`` imports it, so the lock's session cannot be imported there without a cycle).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import BankError, InputError
from .lease import Lease, grant
from .lock import BankSession


def lease_to_file(bank_path, out, name: str, concepts: int, rank: int, wait: bool = False,
                  author: str | None = None, seed: int | None = None) -> Lease:
    """Grant a lease of the bank file ``bank_path`` under its lock, record it there and write the
    lease file ``out`` (never an existing file). What the CLI and the tab call."""
    bank_path, out = Path(bank_path), Path(out)
    if out.resolve() == bank_path.resolve():
        raise InputError("The lease file must be another file than the bank.")
    if out.exists():
        raise InputError(f"{out.name} already exists; choose a new name for the lease file.")
    with BankSession(bank_path, wait, f"granting a lease to {name}") as session:
        if session.bank is None:
            raise BankError(f"Bank file {bank_path} does not exist.")
        lease = grant(session.bank, name, concepts, rank, author, seed)
        granted = session.bank.with_lease(lease)
        granted.lease_file(lease.id).save(out)
        try:
            session.commit(granted, what=f"the bank with lease {lease.id}")
        except BaseException:
            out.unlink(missing_ok=True)  # a lease the bank does not record must not exist
            raise
    return lease
