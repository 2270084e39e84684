"""Run inside the container by the virtualenv's Python, under wadaemon.service's hardening.

Imports every extension module the package carries, loads every other shared library in it with
ctypes (bundled libraries such as Pillow's, and neonize's Go library, whose runtime starts its
threads and signal handlers on load), calls C through ctypes callbacks (libffi closures: what
MemoryDenyWriteExecute= can break), imports neonize as the daemon does (python-magic finds
libmagic, the Go library's version check must pass without any download), then seals a blob
with AES-GCM. Prints one line; exits 1 if anything failed.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import sys
import sysconfig
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# extension modules that import a standard-library module Debian ships in a separate package,
# for features the daemon never uses: their import fails with or without any hardening
NEEDS_OPTIONAL = {"PIL._imagingtk": "tkinter"}  # Pillow's Tk bridge (python3-tk)


def shared_objects(site: Path) -> tuple[list[str], list[Path]]:
    """(extension modules by dotted name, other shared libraries by path)"""
    modules, libraries = [], []
    for so in sorted(site.rglob("*.so*")):
        rel = so.relative_to(site)
        if not so.is_file() or so.name.startswith("_test"):
            continue  # test helpers some wheels ship
        stem = so.name.split(".")[0]
        packages = rel.parts[:-1]
        if (
            stem.isidentifier()
            and so.name.endswith(".so")
            and all(p.isidentifier() for p in packages)
        ):
            modules.append(".".join((*packages, stem)))
        else:
            libraries.append(so)  # e.g. cffi.libs/libffi-*.so.8, a Go library loaded by ctypes
    return modules, libraries


class Recorder(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    failures = []
    modules, libraries = shared_objects(site)
    skipped = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != NEEDS_OPTIONAL.get(name):
                failures.append(f"import {name}: {exc!r}")
            else:
                skipped.append(f"{name} (needs {exc.name})")
        except Exception as exc:
            failures.append(f"import {name}: {exc!r}")
    for path in libraries:
        try:
            ctypes.CDLL(str(path))
        except OSError as exc:
            failures.append(f"load {path}: {exc}")

    double = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda x: x * 2)
    if double(21) != 42:
        failures.append("ctypes callback returned a wrong value")
    libc = ctypes.CDLL(None)
    values = (ctypes.c_int * 4)(3, 1, 4, 2)
    compare = ctypes.CFUNCTYPE(
        ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)
    )(lambda a, b: a[0] - b[0])
    libc.qsort(values, len(values), ctypes.sizeof(ctypes.c_int), compare)
    if list(values) != [1, 2, 3, 4]:
        failures.append(f"qsort through a ctypes callback gave {list(values)}")

    # neonize logs "downloading..." before it fetches another Go library (version mismatch)
    said: list[str] = []
    logging.getLogger("neonize").addHandler(Recorder(said))
    logging.getLogger("neonize").setLevel(logging.DEBUG)
    go_version = "-"
    try:
        import magic
        from neonize import _binder
        from neonize.aioze import client as _aioze_client  # noqa: F401 (what the daemon loads)

        go_version = _binder.gocode.GetVersion().decode()
        if magic.from_buffer(b"%PDF-1.4\n", mime=True) != "application/pdf":
            failures.append("libmagic did not recognise a PDF header")
    except Exception as exc:
        failures.append(f"import neonize: {exc!r}")
    downloads = [m for m in said if "download" in m.lower()]
    if downloads:
        failures.append(f"neonize tried to download its library: {downloads}")

    key = AESGCM.generate_key(bit_length=256)
    sealed = AESGCM(key).encrypt(b"\0" * 12, b"session", b"ad")
    if AESGCM(key).decrypt(b"\0" * 12, sealed, b"ad") != b"session":
        failures.append("AES-GCM round trip failed")

    print(
        f"hardening probe: {len(modules) - len(skipped)} extension modules imported "
        f"(not {', '.join(skipped) or 'none'}), {len(libraries)} other "
        f"shared libraries loaded, neonize's Go library {go_version}, libmagic, ctypes "
        f"callbacks and AES-GCM tried; "
        f"failures: {'; '.join(failures) or 'none'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
