"""Give a restored session the modes and numeric owners its writer had (recorded in the
manifest), as far as the daemon's user may: root sets everything; another user sets the modes,
and the group when it belongs to that group. What cannot be set is reported, never guessed."""

from __future__ import annotations

import os
from pathlib import Path

from wadaemon.manifest import Manifest

SPECIAL_BITS = 0o6000  # setuid, setgid


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
    special_missed: list[str] = []
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
        try:
            os.chmod(path, mode & 0o7777, follow_symlinks=False)
        except PermissionError:
            if not mode & SPECIAL_BITS:
                raise
            # a hardened unit (RestrictSUIDSGID=) may not set setuid/setgid bits
            os.chmod(path, mode & 0o1777, follow_symlinks=False)
            special_missed.append(rel)
    notes = []
    if special_missed:
        notes.append(
            f"could not set the setuid/setgid bits of {len(special_missed)} files or "
            f"directories (for example {special_missed[0]}): the daemon may not "
            "(RestrictSUIDSGID= in its unit); set them again with chmod if the writer needs them"
        )
    if owners_missed or groups_missed:
        notes.append(_owners_note(owners_missed, groups_missed, example))
    return "; ".join(notes)


def _owners_note(owners_missed: set[int], groups_missed: set[int], example: str) -> str:
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
