"""The project's error types; every message reads ``archive: member: what failed``.

    BioscanError                 anything a user can act on
    ├── ArchiveError             an archive cannot be opened or indexed
    ├── MemberError              one member cannot be read (the mount answers EIO)
    │   ├── UnsupportedError     a compression method we cannot decode (ENOTSUP)
    │   └── EncryptedError       encrypted, and no password or a wrong one (EACCES)
    ├── NotFound                 a path that is not in the tree (ENOENT)
    ├── SourceError              discovery: missing pieces, no packages found
    ├── UntrustedIndexError      an index folder or file another user could have written
    ├── DamagedIndex             a part of the index failed its check while mounted (EIO)
    └── MountError               the kernel mount itself failed (bad -o option, mount point)
"""
from __future__ import annotations

import errno
from typing import Optional


class BioscanError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    errno = errno.EIO


class ArchiveError(BioscanError):
    """An archive is not a usable zip (bad end record, directory out of bounds, ...)."""

    def __init__(self, archive: str, what: str) -> None:
        super().__init__(f"{archive}: {what}")
        self.archive = archive


class MemberError(BioscanError):
    """One member cannot be served; its neighbours still can."""

    def __init__(self, archive: str, member: str, what: str) -> None:
        super().__init__(f"{archive}: {member}: {what}")
        self.archive = archive
        self.member = member


class UnsupportedError(MemberError):
    """The member uses a method or encryption this build cannot decode."""

    errno = errno.ENOTSUP


class EncryptedError(MemberError):
    """The member is encrypted and no (right) password was given."""

    errno = errno.EACCES


class NotFound(BioscanError):
    """A path is not in the mounted tree."""

    errno = errno.ENOENT

    def __init__(self, path: str, what: Optional[str] = None) -> None:
        super().__init__(f"{path}: {what or 'no such file or directory'}")
        self.path = path


class SourceError(BioscanError):
    """The set of archives is unusable as given (missing piece, nothing found)."""


class UntrustedIndexError(BioscanError):
    """An index folder or file that another user could have written. Its CRC-32 is no
    defence (anyone can recompute it), so it is refused rather than read or overwritten."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(f"{path}: {what}")
        self.path = path


class DamagedIndex(BioscanError):
    """A part of a mapped index failed its check on first use (a flipped bit, a forged
    table): what needs it gets EIO, and the file is removed so the next mount rebuilds it."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"index {where} is damaged ({what}); the next mount builds it again")


class MountError(BioscanError):
    """libfuse refused to mount: a bad ``-o`` option, an unusable mount point."""

    def __init__(self, mountpoint: str, what: str) -> None:
        super().__init__(f"{mountpoint}: {what}")
