"""Turning an untrusted member name into a safe relative path, or refusing it.

Owns the naming policy; knows nothing of zip records or FUSE. Paths are kept as bytes
(UTF-8, or the raw bytes when they are not valid UTF-8), so every name round-trips
through the kernel exactly; Python strings carry them with ``surrogateescape``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

NAME_MAX = 255
#: Linux's PATH_MAX counts the final NUL: no path the kernel takes is longer than 4,095 bytes.
PATH_MAX = 4096


def clean_name(raw: bytes, utf8_flag: bool) -> Tuple[Optional[bytes], Optional[str]]:
    """Map a raw central-directory name to a path inside the mount, or None to skip it.

    Returns ``(path, note)``; ``note`` says why a name was changed or skipped.

    ============================  ==========================  =====================
    raw name                      path                        note
    ============================  ==========================  =====================
    ``a/b.jpg``                   ``a/b.jpg``                 -
    ``/abs/x.jpg``                ``abs/x.jpg``               absolute path made relative
    ``./a//b/./c``                ``a/b/c``                   -
    ``a\\b.jpg``                  ``a/b.jpg``                 -
    ``dir/``                      ``dir``                     - (a directory entry)
    ``../x``, ``a/../../x``       None                        '..' component: skipped
    ``a\\x00b``                   None                        NUL in name: skipped
    ``x`` * 300                   None                        component over NAME_MAX
    ``a/`` * 2100                 None                        path over PATH_MAX - 1
    ``/``, ``.``, empty           None                        empty name: skipped
    ``caf\\x82`` (no UTF-8 flag)  ``café`` (CP437 decoded)    -
    ``\\xff`` (flag set, bad)     ``\\xff`` kept as raw bytes -
    ============================  ==========================  =====================

    Without the UTF-8 flag, names that are valid UTF-8 are taken as UTF-8 (many tools
    write it without setting the flag); other bytes are read as CP437 (APPNOTE D.1).
    """
    if b"\x00" in raw:
        return None, "NUL in name: skipped"
    if not utf8_flag and any(byte > 0x7F for byte in raw):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("cp437").encode("utf-8")
    parts = raw.replace(b"\\", b"/").split(b"/")
    kept = [part for part in parts if part not in (b"", b".")]
    if b".." in kept:
        return None, "'..' component: skipped"
    if not kept:
        return None, "empty name: skipped"
    if any(len(part) > NAME_MAX for part in kept):
        return None, f"a component is longer than {NAME_MAX} bytes: skipped"
    path = b"/".join(kept)
    if len(path) >= PATH_MAX:
        return None, f"path is longer than {PATH_MAX - 1} bytes: skipped"
    note = "absolute path made relative" if raw.startswith((b"/", b"\\")) else None
    return path, note


def link_stays_inside(link_path: bytes, target: bytes,
                      is_link: Callable[[bytes], bool] = lambda path: False) -> bool:
    """Whether a symlink at ``link_path`` (relative to the root) pointing to ``target``
    resolves inside the tree; absolute targets and any climb above the root do not.

    The walk is lexical, which is only what the kernel does when no component before the
    last is itself a link (``a/up -> ..`` makes ``a/up/../x`` climb twice): a target that
    passes through another link (``is_link``) is refused.

    >>> link_stays_inside(b"a/b/link", b"../c.jpg"), link_stays_inside(b"a/link", b"../../etc/passwd")
    (True, False)
    """
    if not target or target.startswith(b"/") or b"\x00" in target:
        return False
    parts = link_path.split(b"/")[:-1]
    pieces = target.split(b"/")
    for i, part in enumerate(pieces):
        if part == b"..":
            if not parts:
                return False
            parts.pop()
        elif part not in (b"", b"."):
            parts.append(part)
            if i < len(pieces) - 1 and is_link(b"/".join(parts)):
                return False
    return True
