"""The persisted index: each archive's member table and the merged tree, built once,
saved under the index folder and memory-mapped on every later mount.

Owns when an index is built, reused or rebuilt; the tree's layout and lookups live in
``tree``, its construction in ``merge``, the file container in ``store``.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from . import store, zipdir
from .errors import ArchiveError
from .merge import build_tree, summarise
from .tree import BadTables, Tree, check, check_archive_count
from .sources import FileSource

log = logging.getLogger(__name__)

INDEX_VERSION = 4


def default_index_dir() -> str:
    """$XDG_CACHE_HOME/bioscanfs, created if missing: by us, so only its owner can write it
    (0700, whatever the umask) and it passes the folder check of ``store.prepare_folder``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(cache, "bioscanfs")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        pass  # an unwritable home: the index is then kept in memory, with one warning
    return folder


def _members_path(index_dir: str, src: FileSource, key: Any) -> str:
    """One archive's index file: its slot is the archive's paths (or URL), so a new key
    for the same archive supersedes the old file."""
    return store.file_path(index_dir, [entry[0] for entry in src.identity], key, ".members")


def _tree_path(index_dir: str, sources: Sequence[FileSource], key: Any, skip_bad: bool,
               allow_incomplete: bool) -> str:
    """The merged tree's index file: its slot is the set of archives and the options."""
    slot = [[entry[0] for entry in src.identity] for src in sources] + [skip_bad, allow_incomplete]
    return store.file_path(index_dir, slot, key, ".tree")




def load_tree(sources: Sequence[FileSource], index_dir: Optional[str],
              on_archive: Optional[Callable[[str], None]] = None,
              skip_bad: bool = False, allow_incomplete: bool = False) -> Tuple[Tree, List[FileSource]]:
    """Map the persisted tree of these archives, building what is missing or stale.

    Returns the tree and the sources it covers (a bad archive is dropped and closed when
    ``skip_bad``, or when it has several pieces and ``allow_incomplete``: its last piece
    may be missing; else its ArchiveError propagates). ``index_dir=None`` keeps all in
    memory, as does an index folder that cannot be written (``Tree.persisted`` says which).
    Raises UntrustedIndexError for an index folder or file another user could have written.
    """
    check_archive_count(len(sources))
    keys = [[INDEX_VERSION, src.identity] for src in sources]
    tree_key = ["tree", INDEX_VERSION, keys, skip_bad, allow_incomplete]
    path = None
    if index_dir:
        store.prepare_folder(index_dir)
        path = _tree_path(index_dir, sources, tree_key, skip_bad, allow_incomplete)
        store.tidy(index_dir, [path] + [_members_path(index_dir, s, k) for s, k in zip(sources, keys)])
    cached = store.load(path, tree_key) if path else None
    if cached is not None:
        try:
            kept = [s for s in sources if s.name in set(cached["__extra__"]["kept"])]
            check(cached, [s.size for s in kept])
            store.release_pages(cached)
            tree = Tree(cached, [s.name for s in kept], persisted=True)
        except (KeyError, ValueError, IndexError, TypeError) as err:  # BadTables is a ValueError
            log.warning("index %s is damaged (%s); rebuilding it", path, err)
        else:
            for src in sources:
                if src not in kept:
                    src.close()
            return tree, kept
    members, kept, from_index = _parse_all(sources, keys, index_dir, on_archive, skip_bad, allow_incomplete)
    arrays, extra = build_tree(members, [s.name for s in kept])
    try:
        if from_index:  # a tree merged from member tables parsed just now needs no check
            check(arrays, [s.size for s in kept])
    except BadTables as err:  # only a forged member table in the index folder gets here
        log.warning("index in %s is damaged (%s); parsing the archives again", index_dir, err)
        members, kept, _ = _parse_all(kept, [[INDEX_VERSION, s.identity] for s in kept], None, None,
                                      skip_bad, allow_incomplete)
        arrays, extra = build_tree(members, [s.name for s in kept])
    extra["kept"] = [s.name for s in kept]
    del members
    if path:
        try:
            store.save(path, tree_key, arrays, extra)
        except OSError as err:
            log.warning("cannot write the index to %s (%s); keeping it in memory", index_dir, err.strerror or err)
        else:
            mapped = store.load(path, tree_key)
            if mapped is not None:
                return Tree(mapped, extra["kept"], persisted=True), kept
    arrays["__extra__"] = extra
    return Tree(arrays, extra["kept"]), kept


def _parse_all(sources: Sequence[FileSource], keys: List[Any], index_dir: Optional[str],
               on_archive: Optional[Callable[[str], None]], skip_bad: bool, allow_incomplete: bool
               ) -> Tuple[List[zipdir.Members], List[FileSource], bool]:
    """Every archive's member table, the archives kept, and whether any table came from the
    index folder; numpy releases the GIL, so archives parse in parallel."""
    def parse(job: Tuple[FileSource, Any]) -> Union[Tuple[zipdir.Members, bool], ArchiveError]:
        try:
            return _archive_members(job[0], job[1], index_dir)
        except ArchiveError as err:
            return err
        except OSError as err:  # an archive that opened but cannot be read (an I/O error)
            return ArchiveError(job[0].name, f"cannot be read ({err.strerror or err})")
        finally:
            if on_archive:
                on_archive(job[0].name)

    members: List[zipdir.Members] = []
    kept: List[FileSource] = []
    from_index = False
    refused: List[ArchiveError] = []
    with ThreadPoolExecutor(max_workers=min(len(sources), os.cpu_count() or 1) or 1) as pool:
        for src, result in zip(sources, pool.map(parse, zip(sources, keys))):
            if isinstance(result, ArchiveError):
                pieces = len(src.identity) > 1
                if skip_bad or (allow_incomplete and pieces):
                    log.warning("skipping %s%s", result, "; a piece may be missing" if pieces else "")
                else:
                    refused.append(result)
                src.close()
                continue
            members.append(result[0])
            from_index |= result[1]
            kept.append(src)
    if refused:
        raise refused[0] if len(refused) == 1 else ArchiveError(
            f"{len(refused)} archives", "cannot be used (--skip-bad mounts the rest):\n" +
            "\n".join(str(err) for err in refused))
    return members, kept, from_index


def _archive_members(src: FileSource, key: Any, index_dir: Optional[str]) -> Tuple[zipdir.Members, bool]:
    """One archive's parsed central directory, and whether it came from its own persisted
    index (whose values are then not to be trusted before the tree's check).

    Its warnings are summarised before they are logged or saved: an archive of 200,000
    bad names gives 11 lines, and its index header stays small enough to be read back."""
    path = _members_path(index_dir, src, key) if index_dir else None
    if path:
        cached = store.load(path, key)
        if cached is not None:
            return zipdir.Members(cached["table"], cached["names"], cached["name_ends"],
                                  cached["is_dir"], cached["__extra__"]), True
    members = zipdir.read_members(src)
    members = members._replace(warnings=summarise(
        members.warnings, lambda rest: f"{src.name}: {rest:,} more members whose names were skipped or changed"))
    for line in members.warnings:
        log.warning("%s", line)
    if path:
        try:
            store.save(path, key, {"table": members.table, "names": members.names,
                                   "name_ends": members.name_ends, "is_dir": members.is_dir},
                       members.warnings)
        except OSError:
            pass  # load_tree reports the unwritable folder once
    return members, False
