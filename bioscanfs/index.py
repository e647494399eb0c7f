"""The persisted index: the merged tree of a set of archives, built once, saved under the
index folder and memory-mapped on every later mount.

Owns when an index is built, reused or rebuilt; the tree's layout and lookups live in
``tree``, its construction in ``merge``, the file container in ``store``.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from . import store, views, zipdir
from .errors import ArchiveError, BioscanError, DamagedIndex, SourceError
from .forked import fork_with_pipe
from .layout import METADATA_CSV, METADATA_ZIP
from .reader import Reader
from .sources import FileSource
from .tree import LAZY_COLUMNS, ROW_COLUMNS, UNIT_ROWS, Tree, check_archive_count

if TYPE_CHECKING:
    from .merge import Archive, Builder

log = logging.getLogger(__name__)

INDEX_VERSION = 6
#: Archives parsed and reduced for the merge (``merge.reduce``) ahead of it, in threads:
#: each in flight holds up to ~0.45 GB (a 2.34 M-member archive's directory and member
#: table) and sorts on every core, so two keep two cores busy and more would add memory,
#: not speed, whatever the core count (docs/scale.md: 20.6 M members, 1.55 GB peak with two).
PARSE_AHEAD = 2 if (os.cpu_count() or 1) > 1 else 1
_COPY_BLOCK = 8 << 20


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


def _tree_path(index_dir: str, sources: Sequence[FileSource], key: Any, skip_bad: bool,
               allow_incomplete: bool) -> str:
    """The merged tree's index file: its slot is the set of archives and the options."""
    slot = [[entry[0] for entry in src.identity] for src in sources] + [skip_bad, allow_incomplete]
    return store.file_path(index_dir, slot, key, ".tree")


#: Told of each archive parsed while an index is built: (its name, its members, archives
#: done, archives in all); ``cli`` shows it on a terminal.
Progress = Callable[[str, int, int, int], None]


def _tree_key(sources: Sequence[FileSource], skip_bad: bool, allow_incomplete: bool,
              views: Sequence[str]) -> List[Any]:
    """What a tree is built from: the archives' identities (the metadata CSV's archive
    among them), the options and the ranks of its views."""
    return ["tree", INDEX_VERSION, [src.identity for src in sources], skip_bad, allow_incomplete, list(views)]


def load_tree(sources: Sequence[FileSource], index_dir: Optional[str],
              on_archive: Optional[Progress] = None, skip_bad: bool = False, allow_incomplete: bool = False,
              views: Sequence[str] = (), apart: bool = False) -> Tuple[Tree, List[FileSource]]:
    """Map the persisted tree of these archives, building it when missing or stale.

    Returns the tree and the sources it covers (a bad archive is dropped and closed when
    ``skip_bad``, or when it has several pieces and ``allow_incomplete``: its last piece
    may be missing; else its ArchiveError propagates). ``index_dir=None`` keeps all in
    memory, as does an index folder that cannot be written (``Tree.persisted`` says which).
    With ``views`` (ranks) and the metadata zip among the sources, the tree also holds the
    views of those ranks, built from the image tree (the tree without views) once it is
    there. Raises UntrustedIndexError for an index folder or file another user could have written.

    With ``apart`` (local archives and an index folder), a tree that has to be built is
    built in a child process and then mapped here, as a remount maps it: a process that
    forks a long-lived server afterwards (a mount's daemon) does not hand it the build's
    heap, freed but not given back (200-270 MB with views, docs/scale.md). Should the
    child not save it (a full folder), it is built here again.
    """
    check_archive_count(len(sources))
    if not any(src.name.rsplit("/", 1)[-1] == METADATA_ZIP for src in sources):
        views = ()   # no metadata zip: the tree is the image tree, at no extra cost
    tree_key = _tree_key(sources, skip_bad, allow_incomplete, views)
    path = None
    if index_dir:
        store.prepare_folder(index_dir)
        path = _tree_path(index_dir, sources, tree_key, skip_bad, allow_incomplete)
        store.tidy(index_dir, [path])
    mapped = _reused(path, tree_key, sources) if path else None
    if mapped is not None:
        return mapped
    if apart and path and os.access(index_dir, os.W_OK) and all(type(src) is FileSource for src in sources):
        _built_apart(lambda progress: load_tree(sources, index_dir, progress, skip_bad, allow_incomplete, views),
                     on_archive)
        mapped = _reused(path, tree_key, sources)
        if mapped is not None:
            return mapped   # else not saved (a full folder): built here, kept in memory
    if not views:
        return _images(sources, index_dir, path, tree_key, on_archive, skip_bad, allow_incomplete, extend=True)
    images_key = _tree_key(sources, skip_bad, allow_incomplete, ())
    images_path = path and _tree_path(index_dir, sources, images_key, skip_bad, allow_incomplete)
    images = _reused(images_path, images_key, sources) if images_path else None
    if images is not None and images[0].n_files != len(images[0].files):
        images = None   # extended by a mount without views: the views are built from whole columns
    built = images is None
    if images is None:
        # Not extended: the views are built from whole columns, and this tree is removed then.
        images = _images(sources, index_dir, images_path, images_key, on_archive, skip_bad, allow_incomplete,
                         extend=False)
    tree = _with_views(images[0], images[1], views, index_dir, path, tree_key)
    if built and images_path and tree is not images[0]:
        # The views' tree holds all of it; an earlier tree for re-indexing is found among those.
        store.remove(images_path)
    return tree, images[1]


#: True in the child of ``_built_apart``: a tree it cannot save is not kept in memory there
#: (``_Unsaved``); the parent then builds it itself, and warns once.
_MUST_SAVE = False


class _Unsaved(Exception):
    """A tree built in the child of ``_built_apart`` could not be saved."""


def _built_apart(build: Callable[[Progress], Any], on_archive: Optional[Progress]) -> None:
    """Run ``build`` in a forked child process and wait for it: the progress it reports
    goes to ``on_archive`` here, and its error (one line) is raised here, as a SourceError."""
    pid, pipe = fork_with_pipe()
    if pid == 0:
        os._exit(_build_in_child(build, pipe))
    error = None
    with os.fdopen(pipe, "rb") as events:
        for line in events:
            event = json.loads(line)
            if "error" in event:
                error = event["error"]
            elif on_archive:
                on_archive(*event["progress"])
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if error is not None or status:
        raise SourceError(error or f"building the index ended with status {status}")


def _build_in_child(build: Callable[[Progress], Any], write_end: int) -> int:
    """The child of ``_built_apart``: runs ``build``, telling its progress and error as JSON
    lines; returns the exit status."""
    global _MUST_SAVE
    _MUST_SAVE = True
    with os.fdopen(write_end, "wb", buffering=0) as events:
        def tell(**event: Any) -> None:
            events.write(json.dumps(event).encode() + b"\n")
        try:
            build(lambda *progress: tell(progress=progress))
            return 0
        except _Unsaved:
            return 0   # the parent finds no tree, and builds it
        except BioscanError as err:
            tell(error=str(err))
            return 1
        except BaseException as err:  # a bug or an interrupt: said in one line all the same
            tell(error=f"building the index failed: {err!r}")
            return 2
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()


def _images(sources: Sequence[FileSource], index_dir: Optional[str], path: Optional[str], key: Any,
            on_archive: Optional[Progress], skip_bad: bool, allow_incomplete: bool,
            extend: bool) -> Tuple[Tree, List[FileSource]]:
    """The image tree, built (from an earlier one where it can: ``extend`` it or not)."""
    return _build(sources, index_dir, path, key, on_archive, skip_bad, allow_incomplete,
                  _earlier_tree(path, key, sources, extend) if path else None)


def _archive_sizes(arrays: Dict[str, Any], sizes: Sequence[int]) -> List[int]:
    """The size of every archive a tree's rows may name: its archives' ``sizes``, then its
    views' classes zip."""
    return list(sizes) + ([len(arrays["views_zip"])] if "views_zip" in arrays else [])


def _mapped(path: str, key: Any, sources: Sequence[FileSource]) -> Optional[Tuple[Tree, List[FileSource]]]:
    """The tree saved at ``path`` under ``key`` and the sources it covers (the others are
    closed), once checked; None when there is none or it is damaged (logged)."""
    # The bulk columns are checked as requests first need them (tree.py), not here: a
    # remount reads a few MB of the index, not all of it (docs/scale.md).
    cached = store.load(path, key, lazy=LAZY_COLUMNS)
    if cached is None:
        return None
    try:
        kept = [s for s in sources if s.name in set(cached["__extra__"]["kept"])]
        tree = Tree(cached, [s.name for s in kept], _archive_sizes(cached, [s.size for s in kept]), persisted=True)
    except (KeyError, ValueError, IndexError, TypeError) as err:  # BadTables is a ValueError
        log.warning("index %s is damaged (%s); rebuilding it", path, err)
        return None
    for src in sources:
        if src not in kept:
            src.close()
    return tree, kept


def _with_views(images: Tree, kept: List[FileSource], ranks: Sequence[str], index_dir: Optional[str],
                path: Optional[str], key: Any) -> Tree:
    """The image tree with the views of ``ranks`` added, saved at ``path``; with none when
    the metadata CSV is not there, cannot be read, or a ``views`` folder is already in the
    archives (the same tree with no links, saved as well: a remount does not try again).
    The image tree itself when pyarrow is missing (views come once it is installed)."""
    from .merge import ViewsBuilder

    images.verify_all()   # the views are built from whole columns
    row = views.csv_member(images)
    why = views.available()
    if row is not None and why:
        log.warning("no views/: %s", why)
        return images
    plan = None
    if row is not None and images.find_dir(0, views.VIEWS) < 0 and images.find_file(0, views.VIEWS) < 0:
        member = images.member(row)
        where = f"{kept[member.archive].name}: {METADATA_CSV}"
        reader = Reader(kept)
        plan = views.plan(images, lambda: views.piped(lambda sink: reader.copy_to(member, METADATA_CSV, sink)),
                          ranks, where, member.mtime)
    elif row is not None:
        log.warning("no views/: the archives hold a views folder or file of their own")
    builder = ViewsBuilder(images, plan or views.empty_plan(), len(kept))
    extra = dict(images.extra, kept=[s.name for s in kept], identities=[s.identity for s in kept])
    return _save(index_dir, path, key, builder.layout(), lambda out: builder.write(out, extra),
                 [s.name for s in kept], [s.size for s in kept] + [len(builder.views_zip)])


def _reused(path: str, key: Any, sources: Sequence[FileSource]) -> Optional[Tuple[Tree, List[FileSource]]]:
    """The tree saved at ``path`` under ``key`` (``_mapped``), or else an earlier one whose
    archives are all the same but for their identities (``_rekeyed``)."""
    return _mapped(path, key, sources) or _rekeyed(path, key, sources)


def _newest_earlier(path: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(path, header) of the newest other tree of the same slot (archive paths and options),
    when its header has a key."""
    folder, name = os.path.split(path)
    candidates = [p for p in glob.glob(os.path.join(glob.escape(folder), name.partition("-")[0] + "-*.tree"))
                  if p != path]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: os.stat(p).st_mtime_ns)
    header = store.read_header(newest)
    return (newest, header) if header and isinstance(header.get("key"), list) else None


def _rekeyed(path: str, key: Any, sources: Sequence[FileSource]) -> Optional[Tuple[Tree, List[FileSource]]]:
    """The newest earlier tree of this slot saved again at ``path`` under ``key``, when it
    was built from these very archives with the same options, every archive was kept, and
    each whose identity (size, mtime, inode) changed since has the same directory digest:
    touched, copied back or downloaded again. Its header is saved again under the new key,
    naming the same column files with the same CRCs (its bulk is checked on first use, as
    it would have been there); no archive is parsed. Where it cannot be saved (a shared
    read-only index), the earlier file is mapped as it is. None otherwise."""
    earlier = _newest_earlier(path)
    if earlier is None:
        return None
    old_path, header = earlier
    old_key, extra, key = header["key"], header.get("extra"), json.loads(json.dumps(key))
    if len(old_key) != len(key) or old_key[:2] != key[:2] or old_key[3:] != key[3:]:
        return None
    try:
        if extra["kept"] != [src.name for src in sources] or not _same_directories(sources, extra):
            return None
    except (KeyError, IndexError, TypeError, ValueError, ArchiveError, OSError):
        return None
    if store.load(old_path, old_key, lazy=LAZY_COLUMNS) is None:
        return None
    log.info("archives touched or copied again since the last index, with the same directories: "
             "it is used again, nothing is parsed")
    try:
        store.rekey(old_path, path, key, dict(extra, identities=key[2]))
    except OSError:   # a folder we may not write (a shared index), or a full one: served as it is
        return _mapped(old_path, old_key, sources)
    return _mapped(path, key, sources)


def _same_directories(sources: Sequence[FileSource], extra: Dict[str, Any]) -> bool:
    """Whether every archive whose identity differs from the one ``extra`` saved has the
    directory digest saved there. Those are read only when every one of them kept its
    size (the digest covers it): a grown archive costs no read here. Raises what
    ``directory_digest`` does, IndexError or TypeError for a damaged ``extra``."""
    old, digests = extra["identities"], extra["digests"]
    if not (isinstance(old, list) and isinstance(digests, list) and len(old) == len(digests) == len(sources)):
        return False
    changed = [(src, identity, digest) for src, identity, digest in zip(sources, old, digests)
               if json.dumps(identity) != _identity(src)]
    if any([piece[1] for piece in identity] != [piece[1] for piece in src.identity] for src, identity, _ in changed):
        return False
    return all(zipdir.directory_digest(src) == digest for src, _, digest in changed)


class _Earlier(NamedTuple):
    """A tree built before for the same archive paths, and what can be taken from it. Its
    bulk is checked as it is read (``tree.Tree``): by units, or whole by ``verify_all``."""

    tree: Tree
    archive_of: Dict[str, int]      #: identity (JSON) of each unchanged archive -> its number there
    warnings: List[List[str]]       #: each archive's warnings there
    digests: List[Optional[str]]    #: each archive's directory digest there (None: built before they were kept)
    #: per archive, runs of the folders holding its files (merge.ARCHIVE_FOLDERS), when the
    #: archives are numbered there as they are now; else None
    folders: Optional[List[List[int]]]
    sizes: List[int]                #: each archive's size there
    extend: bool                    #: whether a re-index may extend it (``_extending``)


def _identity(src: FileSource) -> str:
    return json.dumps(src.identity)


def _earlier_tree(path: str, key: Any, sources: Sequence[FileSource], extend: bool) -> Optional[_Earlier]:
    """The newest tree of the same slot (archive paths and options) built before, when some
    of its archives are unchanged and it lost none of their files (see ``_lost_nothing``):
    then only the others are parsed again, and it may be extended when ``extend``. None
    otherwise, or when it is damaged."""
    from .merge import ARCHIVE_FOLDERS

    earlier = _newest_earlier(path)
    if earlier is None:
        return None
    newest, header = earlier
    old_key = header["key"]
    if not (len(old_key) == len(key) and old_key[:2] == key[:2]
            and old_key[3:5] == key[3:5]):   # the archives may differ, and the views' ranks
        return None
    arrays = store.load(newest, old_key, lazy=LAZY_COLUMNS)
    if arrays is None:
        return None
    current = {_identity(src): src for src in sources}
    try:
        extra = arrays["__extra__"]
        identities = [json.dumps(identity) for identity in extra["identities"]]
        # Rows of changed archives are not used: their bound is left open.
        sizes = _archive_sizes(arrays, [current[i].size if i in current else 1 << 62 for i in identities])
        tree = Tree(arrays, extra["kept"], sizes, persisted=True)
        if not _lost_nothing(tree, extra):
            return None
        archive_of = {identity: j for j, identity in enumerate(identities) if identity in current}
        digests = extra.get("digests")
        if not (isinstance(digests, list) and len(digests) == len(identities)):
            digests = [None] * len(identities)   # built before digests were kept, or damaged
        numbered = extra["kept"] == [src.name for src in sources] and "links" not in arrays
        folders = _folder_runs(extra.get(ARCHIVE_FOLDERS), len(identities), tree.n_dirs) if numbered else None
        sizes = [sum(int(piece[1]) for piece in identity) for identity in extra["identities"]]
        return _Earlier(tree, archive_of, extra["archive_warnings"], digests, folders, sizes,
                        extend) if archive_of else None
    except (KeyError, ValueError, IndexError, TypeError):  # BadTables is a ValueError
        return None


def _folder_runs(runs: Any, archives: int, n_dirs: int) -> Optional[List[List[int]]]:
    """A tree's ARCHIVE_FOLDERS when they have the right shape: one list per archive of
    ascending folder ids [first, end, ...] below ``n_dirs``; else None. (Their content is
    guarded against accidents by the header's CRC; a folder copied is also checked row by
    row by ``merge.Builder.carry``, a tree extended relies on them: docs/scale.md.)"""
    if not (isinstance(runs, list) and len(runs) == archives):
        return None
    for edges in runs:
        if not (isinstance(edges, list) and len(edges) % 2 == 0 and all(type(e) is int for e in edges)
                and all(a < b for a, b in zip([-1] + edges, edges)) and (not edges or edges[-1] <= n_dirs)):
            return None
    return runs


def _lost_nothing(tree: Tree, extra: Dict[str, Any]) -> bool:
    """Whether every file of every archive is a row of the tree: no duplicate (the one
    served hides the others), no file hidden by a folder, and no folder without files in
    it (it may come from an explicit entry of a changed archive, which the tree does not
    say)."""
    if extra["duplicates"] or extra["hidden"] or len(tree.arrays["conflict_path_ends"]):
        return False
    needed = (tree.dir_hi > tree.dir_lo) | (tree.link_hi > tree.link_lo)
    for dir_id in range(tree.n_dirs - 1, 0, -1):
        needed[int(tree.dir_parent[dir_id])] |= needed[dir_id]
    return bool(needed.all())


def _build(sources: Sequence[FileSource], index_dir: Optional[str], path: Optional[str], key: Any,
           on_archive: Optional[Progress], skip_bad: bool, allow_incomplete: bool,
           earlier: Optional[_Earlier] = None) -> Tuple[Tree, List[FileSource]]:
    """Parse the archives (those unchanged since ``earlier`` are taken from it), merge
    them and write the tree to ``path`` (or keep it in memory); the member rows wait in
    an unlinked spill file meanwhile (see ``merge``). An ``earlier`` tree found damaged
    on the way is dropped, and every archive parsed."""
    from .merge import CarryFailed

    if earlier is not None:
        try:
            return _build_once(sources, index_dir, path, key, on_archive, skip_bad, allow_incomplete, earlier)
        except (CarryFailed, DamagedIndex) as err:
            log.warning("the index built before cannot be used (%s): every archive is parsed", err)
    return _build_once(sources, index_dir, path, key, on_archive, skip_bad, allow_incomplete, None)


def _build_once(sources: Sequence[FileSource], index_dir: Optional[str], path: Optional[str], key: Any,
                on_archive: Optional[Progress], skip_bad: bool, allow_incomplete: bool,
                earlier: Optional[_Earlier]) -> Tuple[Tree, List[FileSource]]:
    """``_build``, raising CarryFailed or DamagedIndex when ``earlier`` is damaged. ``merge``
    is imported here: a remount only maps a tree, and starts sooner without it."""
    from .merge import Builder

    spill = _Spill(index_dir)
    builder = Builder(spill)
    try:
        kept = _add_all(builder, sources, on_archive, skip_bad, allow_incomplete, earlier)
        del earlier
        layout = builder.merge()
        extra_kept = {"kept": [s.name for s in kept], "identities": [s.identity for s in kept],
                      "unit_rows": UNIT_ROWS}
        names = extra_kept["kept"]
        return _save(index_dir, path, key, layout, lambda out: dict(builder.write(out), **extra_kept), names,
                     [s.size for s in kept], builder.extension), kept
    finally:
        spill.close()
        if builder.extension is not None:
            builder.extension.close()   # its locks, when the build failed before the writer had it


def _save(index_dir: Optional[str], path: Optional[str], key: Any, layout: Dict[str, Any],
          write: Callable[[Any], Dict[str, Any]], archives: List[str], sizes: List[int],
          extension: Any = None) -> Tree:
    """The tree that ``write`` streams into a ``store.ColumnWriter`` of ``layout`` (and
    returns the extras of), saved at ``path`` (its ROW_COLUMNS in files of their own, or
    appended to those of ``extension``) and mapped back, or kept in memory when it cannot
    be saved there (with a warning) or there is no index folder. ``sizes``: of every
    archive its rows name. An extension that cannot be saved raises CarryFailed: the
    caller builds the tree whole."""
    from .merge import CarryFailed

    if path:
        writer = None
        try:
            writer = store.ColumnWriter(path, layout, apart=ROW_COLUMNS, extension=extension)
            writer.commit(key, write(writer))
        except OSError as err:
            if writer is not None:
                writer.abort()
            if extension is not None:
                raise CarryFailed(f"it cannot be extended ({err.strerror or err})") from err
            if _MUST_SAVE:
                raise _Unsaved() from err
            log.warning("cannot write the index to %s (%s); keeping it in memory", index_dir, err.strerror or err)
        except BaseException:   # CarryFailed: the caller builds again
            if writer is not None:
                writer.abort()
            raise
        else:
            mapped = store.load(path, key, lazy=LAZY_COLUMNS)
            if mapped is not None:
                return Tree(mapped, archives, sizes, persisted=True)
    writer = store.ColumnWriter(None, layout)
    return Tree(writer.commit(key, write(writer)), archives, sizes)


class _Spill:
    """The unlinked file that holds the member rows while a tree is built (see ``merge``):
    in the index folder, where the index will need more room than this; moved to the
    system's temporary folder if the index folder runs out of room (the index is then
    kept in memory: ``_build``)."""

    def __init__(self, index_dir: Optional[str]) -> None:
        self._file: Optional[BinaryIO] = None
        self._in_tmp = True
        self.size = 0
        if index_dir:
            try:
                self._file, self._in_tmp = tempfile.TemporaryFile(dir=index_dir, buffering=0), False
            except OSError:
                pass
        if self._file is None:
            self._file = tempfile.TemporaryFile(buffering=0)

    def write(self, data: Any) -> None:
        try:
            _write_all(self._file, data)
        except OSError:
            if self._in_tmp:
                raise
            moved = tempfile.TemporaryFile(buffering=0)
            for at in range(0, self.size, _COPY_BLOCK):
                _write_all(moved, os.pread(self._file.fileno(), min(_COPY_BLOCK, self.size - at), at), at)
            self._file.close()
            self._file, self._in_tmp = moved, True
            _write_all(self._file, data, self.size)
        self.size += len(memoryview(data).cast("B"))

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


def _write_all(file: Any, data: Any, at: Optional[int] = None) -> None:
    view = memoryview(data).cast("B")
    position = file.tell() if at is None else at
    while len(view):
        done = os.pwrite(file.fileno(), view, position)
        view, position = view[done:], position + done
    file.seek(position)


def _add_all(builder: Builder, sources: Sequence[FileSource], on_archive: Optional[Progress],
             skip_bad: bool, allow_incomplete: bool, earlier: Optional[_Earlier]) -> List[FileSource]:
    """Parse every archive (PARSE_AHEAD at once, in threads: the C walk releases the GIL), or
    take its rows from ``earlier``, and add it to ``builder`` in order; returns the
    archives kept. With ``earlier``, only its folders that a changed archive touches are
    merged again when that can be done (``_add_carrying``); else its rows are read whole."""
    kept: List[FileSource] = []
    refused: List[ArchiveError] = []
    reuse = earlier.archive_of if earlier else {}
    if reuse:
        log.info("%d of %d archives are unchanged since the last index: only the others are parsed",
                 sum(_identity(src) in reuse for src in sources), len(sources))
    if earlier is not None:
        carried = _add_carrying(builder, sources, on_archive, earlier)
        if carried is not None:
            return carried
        earlier.tree.verify_all()   # every row is read below
    # Copied once, not scanned per archive; rows that no folder shows name no archive.
    archives = np.where(earlier.tree.shown(), earlier.tree.files["archive"], -1) if earlier else None
    for done, (src, result) in enumerate(_parsed([s for s in sources if _identity(s) not in reuse], sources), 1):
        if result is None and earlier is not None:  # unchanged
            archive = reuse[_identity(src)]
            rows = np.flatnonzero(archives == archive)
            builder.add_from_tree(earlier.tree, rows, earlier.warnings[archive], earlier.digests[archive])
            store.release_pages(earlier.tree.arrays)   # its pages stay cached, out of our RSS
            kept.append(src)
            if on_archive:
                on_archive(src.name, len(rows), done, len(sources))
            continue
        if on_archive:
            on_archive(src.name, 0 if isinstance(result, ArchiveError) else result.members, done, len(sources))
        if isinstance(result, ArchiveError):
            pieces = len(src.identity) > 1
            if skip_bad or (allow_incomplete and pieces):
                log.warning("skipping %s%s", result, "; a piece may be missing" if pieces else "")
            else:
                refused.append(result)
            src.close()
            continue
        if not refused:
            builder.add(result)
        kept.append(src)
    if refused:
        raise refused[0] if len(refused) == 1 else ArchiveError(
            f"{len(refused)} archives", "cannot be used (--skip-bad mounts the rest):\n" +
            "\n".join(str(err) for err in refused))
    return kept


def _add_carrying(builder: Builder, sources: Sequence[FileSource], on_archive: Optional[Progress],
                  earlier: _Earlier) -> Optional[List[FileSource]]:
    """Add the archives to ``builder`` when at most PARSE_AHEAD changed since ``earlier``, it
    numbers the archives as they are numbered now and says which folders each one's files
    are in: the changed ones are parsed, the rows of the others in the folders that the
    changed ones touch (then or now) are taken from ``earlier`` to be merged again, and
    every other folder is carried as it is (``merge.Builder.carry``). Returns the
    archives (all kept), or None when this cannot be done (nothing is added then).
    Raises DamagedIndex when a unit of ``earlier`` it reads is damaged."""
    tree = earlier.tree
    changed = [i for i, src in enumerate(sources) if _identity(src) not in earlier.archive_of]
    if earlier.folders is None or not 0 < len(changed) <= PARSE_AHEAD:
        return None
    parsed = dict(zip(changed, (result for _, result in _parsed([sources[i] for i in changed], sources)
                                if result is not None)))
    if any(isinstance(result, ArchiveError) for result in parsed.values()):
        return None   # handled (skipped or refused) with the rest, as in a full build
    touched = _touched_dirs(tree, [earlier.folders[i] for i in changed], parsed.values())
    ranges = [(int(tree.dir_lo[d]), int(tree.dir_hi[d])) for d in np.flatnonzero(touched).tolist()]
    for lo, hi in ranges:
        tree.rows_ready(lo, hi)
    rows = np.concatenate([np.arange(lo, hi) for lo, hi in ranges] or [np.zeros(0, np.int64)])
    archive_of_row = tree.files["archive"][rows]
    shown_after = tree.n_files - int(np.isin(archive_of_row, changed).sum()) + sum(p.members for p in parsed.values())
    extending = _extending(earlier, sources, changed, rows, shown_after)
    log.info("%d of %d folders are taken as they are, the others merged again%s", int((~touched).sum()),
             tree.n_dirs, " and appended to the index" if extending else "")
    for done, src in enumerate(sources, 1):
        i = done - 1
        if i in parsed:
            builder.add(parsed[i])
            members = parsed[i].members
        else:
            taken = rows[archive_of_row == i]
            builder.add_from_tree(tree, taken, earlier.warnings[i], earlier.digests[i])
            members = len(taken)
        if on_archive:
            on_archive(src.name, members, done, len(sources))
    builder.carry(tree, np.flatnonzero(~touched), changed, lambda: store.release_pages(tree.arrays), extending)
    return list(sources)


#: An extended tree's rows that no folder shows (the earlier rows of the folders merged
#: again) stay at most this share of the rows it shows; past it, the tree is written whole.
#: So the index is at most 1.5 times as large as one built whole (docs/scale.md).
UNUSED_ROWS_MAX = 0.5


def _extending(earlier: _Earlier, sources: Sequence[FileSource], changed: List[int], merged: np.ndarray,
               shown_after: int) -> Optional[Any]:
    """A ``merge.Extending`` of ``earlier`` for a re-index that merges its rows ``merged``
    again, to show about ``shown_after`` files, or None when the tree is to be written whole:
    ``earlier`` may not be extended or is not saved in column files, another build holds
    them, a changed archive shrank (the rows left unused must stay inside their archive,
    as every row is checked), or too many rows would be left unused."""
    from .merge import Extending, sum_sizes

    tree = earlier.tree
    if not earlier.extend or tree.blocks is None or earlier.folders is None or \
            any(sources[i].size < earlier.sizes[i] for i in changed):
        return None
    unused = len(tree.files) - tree.n_files + len(merged)
    if unused > UNUSED_ROWS_MAX * shown_after:
        return None
    carried_bytes = tree.total_bytes - sum_sizes(tree.files["size"][merged])
    extension = store.extension(tree.blocks, ROW_COLUMNS) if carried_bytes >= 0 else None
    return Extending(extension, carried_bytes, earlier.folders) if extension else None


def _touched_dirs(tree: Tree, old_folders: List[List[int]], parsed: Iterable[Archive]) -> np.ndarray:
    """Which folders of ``tree`` the changed archives touch: those that held their files
    (``old_folders``: runs of folder ids) or hold them now, the folders of their paths that
    are there already, and every folder above any of these (a new folder may hide a file
    of its parent; a folder's mtime is its subtree's)."""
    from .merge import folders_of

    touched = np.zeros(tree.n_dirs, bool)
    touched[0] = True
    for edges in old_folders:
        touched |= folders_of(edges, tree.n_dirs)
    for archive in parsed:
        for path in itertools.chain(archive.group_dirs, archive.explicit_dirs):
            folder = 0
            for part in path.split(b"/"):
                folder = tree.find_dir(folder, part) if part else folder
                if folder < 0:
                    break
                touched[folder] = True
    parent = tree.dir_parent.astype(np.int64)
    while True:   # as many rounds as the tree is deep
        above = np.zeros_like(touched)
        above[parent[touched]] = True
        if not (above & ~touched).any():
            return touched
        touched |= above


def _parsed(to_parse: Sequence[FileSource], sources: Sequence[FileSource]
            ) -> Iterator[Tuple[FileSource, Union[Archive, ArchiveError, None]]]:
    """(archive, its members reduced for the merge or why not; None for those not
    ``to_parse``) in order, at most PARSE_AHEAD parsed ahead of the consumer: memory holds
    a bounded number of parsed archives, whatever their count."""
    from .merge import reduce

    def parse(src: FileSource) -> Union[Archive, ArchiveError]:
        try:
            return reduce(_read_members(src))
        except ArchiveError as err:
            return err
        except OSError as err:  # an archive that opened but cannot be read (an I/O error)
            return ArchiveError(src.name, f"cannot be read ({err.strerror or err})")

    with ThreadPoolExecutor(max_workers=PARSE_AHEAD) as pool:
        waiting = iter(to_parse)
        pending = deque((src, pool.submit(parse, src)) for src in itertools.islice(waiting, PARSE_AHEAD))
        for src in sources:
            if not pending or pending[0][0] is not src:
                yield src, None
                continue
            result = pending.popleft()[1].result()
            for following in itertools.islice(waiting, 1):
                pending.append((following, pool.submit(parse, following)))
            yield src, result


def _read_members(src: FileSource) -> zipdir.Members:
    """One archive's parsed central directory. Its warnings are summarised before they are
    logged or saved: an archive of 200,000 bad names gives 11 lines, and the index header
    stays small enough to be read back."""
    from .merge import summarise

    members = zipdir.read_members(src)
    members = members._replace(warnings=summarise(
        members.warnings, lambda rest: f"{src.name}: {rest:,} more members whose names were skipped or changed"))
    for line in members.warnings:
        log.warning("%s", line)
    return members
