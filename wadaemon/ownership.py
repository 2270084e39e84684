"""Give a restored session the modes and numeric owners its writer had (recorded in the
manifest), as far as the daemon's user may: root sets everything; another user sets the modes,
and the group when it belongs to that group. What cannot be set is reported, never guessed."""

from __future__ import annotations

import os
from pathlib import Path

from wadaemon.manifest import Manifest


def apply_owners(root: Path, manifest: Manifest) -> str:
    """Set modes, owners and groups under `root` (the rebuilt account directory); returns ""
    or one sentence saying what could not be set and how to fix it."""
    is_root = os.geteuid() == 0
    my_groups = {os.getegid(), *os.getgroups()}
    items: list[tuple[str, int, int | None, int | None]] = [
        (f.path, f.mode, f.uid, f.gid) for f in manifest.files
    ]
    # deepest directories first, the account directory last
    for d in sorted(manifest.dirs, key=lambda d: (d.path == ".", -d.path.count("/"))):
        items.append((d.path, d.mode, d.uid, d.gid))
    owners_missed: set[int] = set()
    groups_missed: set[int] = set()
    example = ""
    for rel, mode, uid, gid in items:
        path = root if rel == "." else root / rel
        set_uid = -1
        if uid is not None and uid != os.geteuid():
            if is_root:
                set_uid = uid
            else:
                owners_missed.add(uid)
                example = example or rel
        set_gid = -1
        if gid is not None and gid != os.getegid():
            if is_root or gid in my_groups:
                set_gid = gid
            else:
                groups_missed.add(gid)
                example = example or rel
        if (set_uid, set_gid) != (-1, -1):
            os.chown(path, set_uid, set_gid, follow_symlinks=False)
        os.chmod(path, mode & 0o7777, follow_symlinks=False)
    if not owners_missed and not groups_missed:
        return ""
    parts = []
    if owners_missed:
        parts.append("owner " + ", ".join(f"uid {u}" for u in sorted(owners_missed)))
    if groups_missed:
        parts.append("group " + ", ".join(f"gid {g}" for g in sorted(groups_missed)))
    return (
        f"could not give the restored files their recorded {' and '.join(parts)} (for example "
        f"{example}): the daemon runs as uid {os.geteuid()} without root"
        + (" and is not in that group" if groups_missed else "")
        + "; they belong to the daemon's user now: chown them, or share a group with the "
        "program that writes them (the group and the modes are then kept)"
    )
