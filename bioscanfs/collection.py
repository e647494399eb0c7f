"""The public core: a set of archives seen as one read-only tree, with no mount needed.

Owns the wiring of discover -> sources -> index -> reader; the FUSE layer and the CLI
are thin users of it. Thread-safe: the tree is read-only and the reader locks its caches.
Paths are '/'-separated and relative to the mount root (a leading '/' is ignored).
"""
from __future__ import annotations

import io
import logging
import stat as stat_mod
import threading
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import cachetools
import numpy as np

from .discover import ArchiveSpec, find_archives
from .errors import BioscanError, NotFound
from .index import Progress, default_index_dir, load_tree
from .names import PATH_MAX, link_stays_inside
from .reader import MemberFile, Reader
from .sources import BytesSource, FileSource, open_sources
from .tree import Tree, check_archive_count
from .zipdir import FLAG_ENCRYPTED, Source

log = logging.getLogger(__name__)

#: What every engine answers for every path (one home for both; test_engines compares them).
#: Content never changes while mounted, so the kernel may keep names, attributes, misses and
#: pages for a day (see docs/design.md).
CACHE_SECONDS = 86400
#: st_blksize and the statfs block: large, so tools read in large pieces.
BLOCK_SIZE = 65536
FILE_MODE = stat_mod.S_IFREG | 0o444
LINK_MODE = stat_mod.S_IFLNK | 0o444
DIR_MODE = stat_mod.S_IFDIR | 0o555
#: The longest symlink target served: readlink(2) returns at most PATH_MAX - 1 bytes.
LINK_TARGET_MAX = PATH_MAX - 1
#: Bytes of symlink verdicts kept (a target costs its length plus LINK_ENTRY_COST).
LINK_CACHE_BYTES = 4 << 20
LINK_ENTRY_COST = 64
_UNKNOWN = object()


def _link_cost(target: Optional[bytes]) -> int:
    return LINK_ENTRY_COST + len(target or b"")


class Stat(NamedTuple):
    mode: int
    size: int
    mtime: int
    nlink: int


def _key(path: Union[str, bytes]) -> bytes:
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    return path.strip(b"/")


class Collection:
    """BIOSCAN-5M zips (folders, zip files or split pieces) as one tree.

    >>> c = Collection("/data/bioscan")                 # doctest: +SKIP
    >>> c.listdir("bioscan5m/images/cropped_256")       # doctest: +SKIP
    ['pretrain', 'test', ...]

    With ``build_apart``, a missing index is built in a forked child process and mapped
    here: a process that forks workers afterwards (a mount's daemon, a loader's workers)
    does not hand them the build's heap. It forks: create the Collection before starting
    threads of your own.
    """

    def __init__(self, *inputs: str, index_dir: Optional[str] = "default", cache_size: int = 256 << 20,
                 skip_bad: bool = False, allow_incomplete: bool = False,
                 password: Optional[bytes] = None, cache_dir: Optional[str] = None,
                 cache_max: int = 10 << 30, on_archive: Optional[Progress] = None,
                 views: Sequence[str] = (), build_apart: bool = False) -> None:
        specs, warnings = find_archives(inputs, allow_incomplete)
        for line in warnings:
            log.warning("%s", line)
        self.index_dir = default_index_dir() if index_dir == "default" else index_dir
        self.tree, self.sources = open_tree(specs, self.index_dir, skip_bad, allow_incomplete, cache_dir, cache_max,
                                            on_archive, views, build_apart)
        kept = {src.name for src in self.sources}
        self.specs = [spec for spec in specs if spec.name in kept]
        self.warnings = warnings + self.tree.warnings
        #: What the rows' archive column numbers: the archives, then the views' classes.txt zip.
        self.served: List[Source] = list(self.sources)
        if self.tree.views_zip:
            self.served.append(BytesSource(self.tree.views_zip, "views (classes.txt)"))
        self.reader = Reader(self.served, cache_size, password)
        self._links: cachetools.LRUCache = cachetools.LRUCache(LINK_CACHE_BYTES, getsizeof=_link_cost)
        self._links_lock = threading.Lock()

    def encrypted_members(self) -> int:
        self.tree.verify_all()   # reads every row
        return int(np.count_nonzero(self.tree.files["flags"][self.tree.shown()] & FLAG_ENCRYPTED))

    # -- lookups -----------------------------------------------------------------------
    def node(self, path: Union[str, bytes]) -> int:
        """File row (>= 0) or directory (-1 - id) at ``path``; raises NotFound."""
        return self.tree.lookup(_key(path))

    def stat_node(self, node: int) -> Stat:
        tree = self.tree
        if node >= 0:
            member = tree.member(node)
            target = self.link_target(node) if stat_mod.S_ISLNK(member.mode) else None
            if target is not None:
                return Stat(LINK_MODE, len(target), member.mtime, 1)
            return Stat(FILE_MODE, member.size, member.mtime, 1)
        dir_id = -1 - node
        return Stat(DIR_MODE, 0, int(tree.dir_mtime[dir_id]), 2 + tree.n_subdirs(dir_id))

    def stat(self, path: Union[str, bytes]) -> Stat:
        return self.stat_node(self.node(path))

    def listdir(self, path: Union[str, bytes] = "") -> List[str]:
        """Names in a directory: subdirectories first, then files, each sorted."""
        node = self.node(path)
        if node >= 0:
            raise NotFound(_key(path).decode("utf-8", "surrogateescape"), "not a directory")
        dirs, files = self.tree.listdir(-1 - node)
        return [name.decode("utf-8", "surrogateescape") for name in (*dirs, *files)]

    def paths(self, prefix: Union[str, bytes] = "") -> Iterator[str]:
        """Every file path under a directory, in tree order."""
        for path, _ in self.tree.file_rows(_key(prefix)):
            yield path.decode("utf-8", "surrogateescape")

    def link_target(self, node: int) -> Optional[bytes]:
        """The target of a symlink member that resolves inside the tree, else None.

        Links that would leave the tree (absolute, or climbing above the root), links
        whose member cannot be read and links declared longer than LINK_TARGET_MAX (never
        decoded) are served as regular files holding the target text, with a warning.
        Verdicts are kept in a byte-bounded LRU.
        """
        with self._links_lock:
            target = self._links.get(node, _UNKNOWN)
        if target is _UNKNOWN:
            target = self._resolve_link(node)
            with self._links_lock:
                self._links[node] = target
        return target

    def _resolve_link(self, node: int) -> Optional[bytes]:
        path = self.tree.path_of(node)
        label = path.decode("utf-8", "surrogateescape")
        size = self.tree.member(node).size
        if size > LINK_TARGET_MAX:
            log.warning("%s: %s: symlink target of %d bytes is longer than readlink allows (%d); "
                        "served as a regular file", self.archive_of(node), label, size, LINK_TARGET_MAX)
            return None
        try:
            target = self.read_node(node, size, 0, label)
        except BioscanError as err:
            log.warning("%s", err)
            return None
        if not link_stays_inside(path, target, self._is_link):
            log.warning("%s: symlink to %r leaves the tree; served as a regular file",
                        label, target.decode("utf-8", "surrogateescape"))
            return None
        return target

    def _is_link(self, path: bytes) -> bool:
        try:
            node = self.tree.lookup(path)
        except NotFound:
            return False
        return node >= 0 and stat_mod.S_ISLNK(self.tree.member(node).mode)

    # -- bytes ---------------------------------------------------------------------------
    def read_node(self, node: int, size: int, offset: int, label: str) -> bytes:
        return self.reader.read(self.tree.member(node), label, size, offset)

    def _file(self, path: Union[str, bytes]) -> int:
        node = self.node(path)
        if node < 0:
            raise NotFound(_key(path).decode("utf-8", "surrogateescape"), "is a directory")
        return node

    def read(self, path: Union[str, bytes], size: int = -1, offset: int = 0) -> bytes:
        """A member's bytes (all of them by default); MemberError when it is corrupt."""
        node = self._file(path)
        total = self.tree.member(node).size
        return self.read_node(node, total if size < 0 else size, offset, _key(path).decode("utf-8", "surrogateescape"))

    def open(self, path: Union[str, bytes]) -> io.BufferedReader:
        """A seekable binary file object over one member."""
        node = self._file(path)
        return io.BufferedReader(MemberFile(self.reader, self.tree.member(node),
                                            _key(path).decode("utf-8", "surrogateescape")), 1 << 16)

    def archive_of(self, node: int) -> str:
        return self.served[self.tree.member(node).archive].name

    def close(self) -> None:
        for src in self.sources:
            src.close()

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tree(specs: Sequence[ArchiveSpec], index_dir: Optional[str], skip_bad: bool = False,
              allow_incomplete: bool = False, cache_dir: Optional[str] = None, cache_max: int = 10 << 30,
              on_archive: Optional[Progress] = None, views: Sequence[str] = (), apart: bool = False
              ) -> Tuple[Tree, List[FileSource]]:
    """Open the archives and map their tree (building and saving what is missing): the
    one way from discovered archives to a tree, for Collection and ``bioscanfs index``.

    Returns the tree and the sources it covers; ``skip_bad`` leaves out, with a warning,
    archives that cannot be opened or parsed; ``views`` are the ranks of the views/
    folder (docs/views.md); ``apart`` builds a missing tree in a child process
    (``index.load_tree``). On failure every source opened is closed.
    """
    check_archive_count(len(specs))
    sources = open_sources([(spec.paths, spec.spanned) for spec in specs], cache_dir, cache_max, skip_bad)
    try:
        return load_tree(sources, index_dir, on_archive, skip_bad, allow_incomplete, views, apart)
    except BaseException:
        for src in sources:
            src.close()
        raise
