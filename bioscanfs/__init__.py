"""bioscanfs: BIOSCAN-5M zip packages as one read-only tree, mounted or from Python.

``Collection`` is the whole public API; the FUSE filesystem (``bioscanfs.fs``) and the
command line (``bioscanfs.cli``) are built on it.
"""
from .collection import Collection, Stat
from .errors import ArchiveError, BioscanError, MemberError, NotFound, SourceError, UnsupportedError

__all__ = ["Collection", "Stat", "BioscanError", "ArchiveError", "MemberError", "NotFound",
           "SourceError", "UnsupportedError"]
