"""Check wadaemon's virtualenv: every installed file as its wheel had it, neonize's Go library
the one neonize expects.

    VENV/bin/python /usr/lib/wadaemon/check-venv.py VENV

install-venv runs it after pip (the shipped copy is /usr/lib/wadaemon/check-venv.py; the system
tests run it on the installed package). Every file that a distribution's RECORD lists with a
hash must have that SHA-256 and size: the wheels were checked against their own SHA-256 before
pip unpacked them, so this catches a file changed or lost since.

neonize compares the version its Go library reports with its own at import and, on a mismatch
(or a missing file), downloads another library from the internet into the virtualenv. The
installed daemon must never do that (it could not anyway: /opt is read-only to the service),
so the build stops here unless:
- the library's SHA-256 and size are the ones in the wheel's RECORD (nothing, such as dh_strip,
  rewrote it), and
- loaded with ctypes, its GetVersion() is the version neonize expects (download.py's
  __GONEONIZE_VERSION__) and the version of the installed distribution.
Prints one line; exits 1 on any difference. Imports nothing from neonize (its import would try
the download).
"""

from __future__ import annotations

import base64
import csv
import ctypes
import hashlib
import re
import sys
from pathlib import Path

LIBRARY = "neonize/neonize-linux-amd64.so"


def check_records(site: Path) -> tuple[int, list[str]]:
    """(files checked, problems) over every RECORD in site-packages."""
    checked, problems = 0, []
    for record in sorted(site.glob("*.dist-info/RECORD")):
        with record.open(newline="") as fh:
            for row in csv.reader(fh):
                if len(row) < 3 or not row[1]:
                    continue  # RECORD itself, and files pip wrote without a hash
                path = (site / row[0]).resolve()
                algorithm, _, expected = row[1].partition("=")
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    problems.append(f"{path}: {exc.strerror}")
                    continue
                digest = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest())
                if digest.rstrip(b"=").decode() != expected or len(data) != int(row[2]):
                    problems.append(f"{path}: not the file {record.parent.name} installed")
                checked += 1
    return checked, problems


def main(venv: Path) -> int:
    sites = sorted(venv.glob("lib/python3*/site-packages"))
    if len(sites) != 1:
        print(f"check-venv: expected one site-packages in {venv}, found {sites}")
        return 1
    site = sites[0]
    checked, problems = check_records(site)
    if problems or not checked:
        print(f"check-venv: {len(problems)} of {checked} files differ from their RECORD:")
        for problem in problems[:20]:
            print(f"  {problem}")
        return 1
    print(f"check-venv: {checked} files match their wheels' RECORD")
    dist_infos = sorted(site.glob("neonize-*.dist-info"))
    if len(dist_infos) != 1:
        print(f"check-venv: expected one neonize-*.dist-info in {site}, found {dist_infos}")
        return 1
    dist_version = dist_infos[0].name.removeprefix("neonize-").removesuffix(".dist-info")
    with (dist_infos[0] / "RECORD").open(newline="") as fh:
        record = {row[0]: row[1:] for row in csv.reader(fh) if row}
    if LIBRARY not in record:
        print(f"check-venv: {LIBRARY} is not in the wheel's RECORD")
        return 1
    algorithm, _, expected = record[LIBRARY][0].partition("=")
    expected_size = int(record[LIBRARY][1])
    path = site / LIBRARY
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest()).rstrip(b"=")
    if digest.decode() != expected or len(data) != expected_size:
        print(
            f"check-venv: {path} is not the wheel's file: {algorithm} {digest.decode()}, "
            f"{len(data)} bytes; RECORD says {expected}, {expected_size} bytes"
        )
        return 1
    download_py = (site / "neonize" / "download.py").read_text()
    found = re.search(r'^__GONEONIZE_VERSION__ = "([^"]+)"', download_py, re.MULTILINE)
    if not found:
        print("check-venv: no __GONEONIZE_VERSION__ in neonize/download.py")
        return 1
    wanted = found.group(1)
    go = ctypes.CDLL(str(path))
    go.GetVersion.restype = ctypes.c_char_p
    reported = go.GetVersion().decode()
    if not reported == wanted == dist_version:
        print(
            f"check-venv: the Go library reports {reported}, neonize expects {wanted}, "
            f"the wheel is {dist_version}: neonize would download another library at import"
        )
        return 1
    print(
        f"check-venv: {LIBRARY} is the wheel's ({len(data)} bytes, {algorithm} matches "
        f"RECORD) and reports version {reported}, the one neonize {dist_version} expects"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
