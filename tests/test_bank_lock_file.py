"""The bank lock leaves no file behind (issue 23) and still admits one writer at a time.

On POSIX the holder unlinks ``.<bank>.lock`` while it still holds the lock; a writer that then locks
the unlinked file must notice and lock the file now at the path. These tests hammer that handover
with several processes doing read-modify-write under the lock: a lost update would show as a
counter short of the number of increments.
"""
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from seqlora_core.bank.lock import BankBusy, BankLock, lock_path_for

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the lock file is only removed on POSIX")


def test_no_lock_file_is_left_after_a_release(tmp_path):
    bank = tmp_path / "bank.safetensors"
    with BankLock(bank, purpose="test"):
        assert lock_path_for(bank).exists()
    assert list(tmp_path.iterdir()) == []


def test_a_refused_writer_names_the_holder_and_leaves_its_file(tmp_path):
    bank = tmp_path / "bank.safetensors"
    with BankLock(bank, purpose="the holder"):
        with pytest.raises(BankBusy, match="the holder"):
            BankLock(bank).acquire()
        assert lock_path_for(bank).exists()
    assert not lock_path_for(bank).exists()


def _increment(bank: str, counter: str, times: int) -> None:
    for _ in range(times):
        with BankLock(Path(bank), wait=True, poll_s=0.001):
            value = int(Path(counter).read_text())
            time.sleep(0.002)  # widen the window a second holder would need
            Path(counter).write_text(str(value + 1))


def test_writers_handing_the_lock_over_lose_no_update(tmp_path):
    bank, counter = tmp_path / "bank.safetensors", tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_increment, args=(str(bank), str(counter), 40)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert counter.read_text() == "160"
    assert not lock_path_for(bank).exists()
