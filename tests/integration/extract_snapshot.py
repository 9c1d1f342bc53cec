"""Write one commit of a bare git directory out as plain files, blob by blob.

Why: the snapshots of A1111 and its repositories that can be fetched here are bare git
directories with some blobs (mostly images) missing, so `git archive` / `git checkout` fail.
This writes every blob that is present and lists the ones that are not.

    python tests/integration/extract_snapshot.py BARE_GIT_DIR COMMIT DEST
"""
from __future__ import annotations

import os
import subprocess
import sys


def extract(git_dir: str, commit: str, dest: str) -> list[str]:
    """Write the tree of `commit` under `dest`; return the paths whose blobs are missing."""
    listing = subprocess.run(
        ["git", "--git-dir", git_dir, "ls-tree", "-r", "-z", commit],
        check=True, capture_output=True,
    ).stdout.decode()
    entries = []
    for record in filter(None, listing.split("\0")):
        meta, path = record.split("\t", 1)
        mode, kind, sha = meta.split()
        if kind == "blob":
            entries.append((mode, sha, path))
    batch = subprocess.Popen(
        ["git", "--git-dir", git_dir, "cat-file", "--batch"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    missing = []
    for mode, sha, path in entries:
        batch.stdin.write(sha.encode() + b"\n")
        batch.stdin.flush()
        header = batch.stdout.readline().decode().split()
        if len(header) < 3 or header[1] == "missing":
            missing.append(path)
            continue
        data = batch.stdout.read(int(header[2]))
        batch.stdout.read(1)  # the newline after each object
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if mode == "120000":
            if os.path.lexists(target):
                os.remove(target)
            os.symlink(data.decode(), target)
            continue
        with open(target, "wb") as handle:
            handle.write(data)
        if mode == "100755":
            os.chmod(target, 0o755)
    batch.stdin.close()
    batch.wait()
    return missing


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    missing = extract(*sys.argv[1:])
    print(f"{len(missing)} blobs missing" + (": " + ", ".join(missing[:20]) if missing else ""))
