"""Sharing banks on tiny, through the command line in separate processes: leases merge exactly,
forks are refused and then rebased, concurrent writers lose nothing, provenance is recorded."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from seqlora_core.bank.format import load_bank
from seqlora_core.bank.lock import BankLock, BankSession, PendingWrite
from tests.test_cli import QUICK, ROOT, assert_user_error, cli


def start(*args, author=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), SEQLORA_CACHE=str(ROOT / ".cache"))
    if author:
        env["SEQLORA_AUTHOR"] = author
    return subprocess.Popen([sys.executable, "-m", "seqlora_core", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(*procs):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def train_args(bank, photos, token, image_token, *extra):
    return ("train", "--bank", bank, "--base", "tiny", "--images", photos[image_token], "--token", token,
            "--init-word", "thing", *QUICK, *extra)


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, photos):
    """A bank with one concept, then two more appended by two concurrent processes (--wait)."""
    folder = tmp_path_factory.mktemp("shared")
    bank = folder / "bank.safetensors"
    names = list(photos)
    cli(*train_args(bank, photos, "<first>", names[0]), "--author", "ann")
    a = start(*train_args(bank, photos, "<racer-a>", names[1], "--wait"))
    b = start(*train_args(bank, photos, "<racer-b>", names[2], "--wait"), author="ben")
    finish(a, b)
    return folder, bank, names


def test_concurrent_appends_lose_nothing_and_record_provenance(shared):
    _, bank, _ = shared
    info = json.loads(cli("bank", "info", bank, "--json").stdout)
    assert sorted(c["id"] for c in info["concepts"]) == ["first", "racer-a", "racer-b"]
    assert info["max_orthogonality_error"] < 1e-6
    authors = {c["id"]: c["author"] for c in info["concepts"]}
    assert authors["first"] == "ann" and authors["racer-b"] == "ben"
    assert [e["action"] for e in info["history"]] == ["append"] * 3
    hashes = {c["id"]: c["hash"] for c in info["concepts"]}
    assert {e["concepts"][0]["hash"] for e in info["history"]} == set(hashes.values())
    assert oct(bank.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_held_lock_refuses_or_waits(shared, tmp_path):
    _, bank, _ = shared
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(bank.read_bytes())
    before = copy.read_bytes()
    with BankLock(copy, purpose="test holder"):
        proc = cli("bank", "remove", copy, "--concept", "first", check=False)
        assert_user_error(proc, "in use", "test holder", "--wait")
        assert copy.read_bytes() == before
    lock = BankLock(copy, purpose="short holder")
    lock.acquire()
    threading.Timer(2.0, lock.release).start()
    t0 = time.time()
    cli("bank", "remove", copy, "--concept", "first", "--wait")
    assert time.time() - t0 >= 1.5
    assert sorted(c.id for c in load_bank(copy).concepts) == ["racer-a", "racer-b"]  # the racers finish in either order


def test_a_bank_changed_behind_the_lock_goes_to_a_pending_file(shared, tmp_path):
    _, bank, _ = shared
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(bank.read_bytes())
    with BankSession(copy) as session:
        ours = session.bank.without("racer-a")
        load_bank(copy).without("first").save(copy)  # a writer that ignores locks
        changed = copy.read_bytes()
        with pytest.raises(PendingWrite) as info:
            session.commit(ours, removed={"racer-a"})
    assert copy.read_bytes() == changed
    pending = info.value.pending
    assert pending.exists() and "bank merge" in str(info.value)
    assert [c.id for c in load_bank(pending).concepts] == ["first", "racer-b"]


def test_leases_train_apart_and_merge_exactly(shared, photos, tmp_path):
    folder, bank, names = shared
    main = tmp_path / "main.safetensors"
    main.write_bytes(bank.read_bytes())
    l1, l2 = tmp_path / "alice.safetensors", tmp_path / "bob.safetensors"
    out = cli("bank", "lease", main, "--name", "alice", "--concepts", "2", "--out", l1, "--author", "alice").stdout
    assert "lease" in out and l1.exists()
    cli("bank", "lease", main, "--name", "bob", "--concepts", "2", "--out", l2)
    info = json.loads(cli("bank", "info", main, "--json").stdout)
    assert [(x["name"], x["concepts"], x["used"], x["returned"]) for x in info["leases"]] == \
        [("alice", 2, 0, None), ("bob", 2, 0, None)]
    assert all(r["leased_width"] == 16 for r in info["layers"])
    assert all(r["capacity"] == r["used"] + (r["in_features"] - 4 * r["used"] - 16) // 4 for r in info["layers"])
    assert_user_error(cli("bank", "lease", main, "--name", "greedy", "--concepts", "12", "--out",
                          tmp_path / "g.safetensors", check=False), "Layer ", "free input dimensions")

    # two artists, two processes each, side by side
    for (ta, ia), (tb, ib) in [(("<a-one>", names[3]), ("<b-one>", names[0])),
                               (("<a-two>", names[1]), ("<b-two>", names[2]))]:
        finish(start(*train_args(l1, photos, ta, ia)), start(*train_args(l2, photos, tb, ib)))
    full = cli(*train_args(l1, photos, "<a-three>", names[2]), check=False)
    assert_user_error(full, "Lease 'alice'", "is full")

    merged = tmp_path / "merged.safetensors"
    cli("bank", "merge", "--out", merged, main, l1, l2)
    other = tmp_path / "other-order.safetensors"
    cli("bank", "merge", "--out", other, l2, main, l1)
    result = load_bank(merged)
    assert [c.id for c in result.concepts][:3] == [c.id for c in load_bank(bank).concepts]
    assert sorted(c.id for c in result.concepts[3:]) == ["a-one", "a-two", "b-one", "b-two"]
    assert result.max_orthogonality_error() <= 1e-6
    assert all(not lease.active for lease in result.leases)
    merged_t, other_t = tensors(merged), tensors(other)
    assert merged_t.keys() == other_t.keys() and all(torch.equal(merged_t[k], other_t[k]) for k in merged_t)
    for lease_file in (l1, l2):
        for key, t in tensors(lease_file).items():
            if key.startswith("concept."):
                assert torch.equal(merged_t[key], t), key  # bit-identical
    history = json.loads(cli("bank", "info", merged, "--json").stdout)["history"]
    assert [e["action"] for e in history].count("return") == 2 and history[-1]["action"] == "merge"


def test_forks_are_refused_then_rebased(shared, photos, tmp_path):
    _, bank, names = shared
    f1, f2 = tmp_path / "fork1.safetensors", tmp_path / "fork2.safetensors"
    f1.write_bytes(bank.read_bytes())
    f2.write_bytes(bank.read_bytes())
    finish(start(*train_args(f1, photos, "<left>", names[3], "--seed", "1")),
           start(*train_args(f2, photos, "<right>", names[0], "--seed", "2")))
    out = tmp_path / "merged.safetensors"
    proc = cli("bank", "merge", "--out", out, f1, f2, check=False)
    assert_user_error(proc, "left", "right", "overlap by", "--rebase")
    assert not out.exists()
    stdout = cli("bank", "merge", "--out", out, f1, f2, "--rebase").stdout
    rebased = [line for line in stdout.splitlines() if line.startswith("rebased ")]
    assert len(rebased) == 1 and "relative residual change" in rebased[0]
    change = float(rebased[0].rsplit(" ", 1)[1])
    assert 0 <= change < 1
    result = load_bank(out)
    assert result.max_orthogonality_error() <= 1e-6
    assert {c.id for c in result.concepts} == {"first", "racer-a", "racer-b", "left", "right"}
    later = result.get(rebased[0].split()[1].rstrip(":"))
    before = load_bank(f1 if later.id == "left" else f2).get(later.id)
    assert later.hash != before.hash and torch.equal(later.embedding, before.embedding)

    # the same id with different contents needs --rename: fork 2 with its concept called 'left'
    f3 = tmp_path / "fork3.safetensors"
    fork2 = load_bank(f2)
    right = fork2.get("right")
    fork2.without("right").with_concept(replace(right, id="left", token="<left>")).save(f3)
    assert_user_error(cli("bank", "merge", "--out", tmp_path / "x.safetensors", f1, f3, check=False),
                      "--rename left=")
    cli("bank", "merge", "--out", tmp_path / "x.safetensors", f1, f3, "--rebase", "--rename", "left=left-2")
    assert "left-2" in {c.id for c in load_bank(tmp_path / "x.safetensors").concepts}


def test_merge_refuses_another_base_and_an_existing_stranger(shared, tmp_path):
    _, bank, _ = shared
    from tests.test_cli import ANOTHER_BASE, _with_base

    other = tmp_path / "other.safetensors"
    _with_base(bank, other, **ANOTHER_BASE)
    assert_user_error(cli("bank", "merge", "--out", tmp_path / "m.safetensors", bank, other, check=False),
                      "another base")
    stranger = tmp_path / "stranger.safetensors"
    stranger.write_bytes(b"keep me")
    assert_user_error(cli("bank", "merge", "--out", stranger, bank, bank, check=False), "not one of the banks")
    assert stranger.read_bytes() == b"keep me"
