"""The ``bioscanfs`` command: one click group, one function per command.

Owns user-facing messages and exit codes; every BioscanError becomes one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, List, Optional, TypeVar

import click

from . import mount_helper, store
from .collection import Collection, open_tree
from .errors import BioscanError, DamagedIndex
from .forked import fork_with_pipe
from .index import default_index_dir
from .layout import IMGTYPES, SPLITS
from .mounts import is_mounted, mounts_at
from .remote import is_url
from .views import RANKS, parse_ranks
from .views import available as available_views

log = logging.getLogger("bioscanfs")
F = TypeVar("F", bound=Callable)
READY_TIMEOUT = 120.0
#: A write to standard output that fails with one of these ends the command with one line.
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class _SizeType(click.ParamType):
    """A byte count such as 512M, 2G, 1.5GiB or 4096: finite and not negative."""

    name = "size"
    _UNITS = {None: 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    _FORM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])I?)?B?", re.IGNORECASE)

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        if isinstance(value, int):
            return value
        match = self._FORM.fullmatch(str(value).strip())
        if not match:
            self.fail(f"{value!r} is not a size such as 512M or 2G", param, ctx)
        return int(float(match[1]) * self._UNITS[match[2] and match[2].upper()])


SIZE = _SizeType()


class _Main(click.Group):
    """The command group; translates errors once for every command (never a traceback):
    the project's errors and failed writes to standard output become one line and exit 1
    (click itself ends quietly when the reader of a pipe has gone, as in ``| head``)."""

    def parse_args(self, ctx: click.Context, args: List[str]) -> List[str]:
        """mount(8) runs ``bioscanfs SOURCE MOUNTPOINT -o OPTIONS``: read as ``bioscanfs mount``."""
        if mount_helper.is_helper_call(args, list(self.commands)):
            args = mount_helper.mount_arguments(args, self.commands["mount"])
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BioscanError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            if err.errno not in _OUTPUT_ERRNOS or err.filename is not None:
                raise
            _discard_stdout()
            raise click.ClickException(f"cannot write to standard output: {err.strerror}") from None


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of what is
    still buffered cannot fail again (and print a traceback) on the way out."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)


def _setup_logging(verbose: int, log_file: Optional[str]) -> None:
    """Log to ``log_file`` or stderr; member names that are not UTF-8 are written escaped."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    handler: logging.Handler = (logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
                                if log_file else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s bioscanfs[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("mfusepy").setLevel(max(level, logging.INFO))
    # libarchive-c logs its warnings without archive or member; our own error line has both.
    logging.getLogger("libarchive").setLevel(logging.ERROR)


def _open(sources, index_dir, cache_size=256 << 20, skip_bad=False, allow_incomplete=False,
          password=None, cache_dir=None, cache_max=10 << 30, views=None, build_apart=False) -> Collection:
    """The commands' Collection. ``views`` defaults to mount's default where views can be
    built (pyarrow installed), so that ls, cat, info and verify map the index a mount made
    instead of building a second one without views; elsewhere to none, quietly."""
    if views is None:
        views = RANKS if available_views() is None else ()
    with _Progress() as progress:
        return Collection(*sources, index_dir=index_dir or default_index_dir(), cache_size=cache_size,
                          skip_bad=skip_bad, allow_incomplete=allow_incomplete, password=password,
                          cache_dir=cache_dir, cache_max=cache_max, on_archive=progress, views=views,
                          build_apart=build_apart)


def _open_checked(sources, index_dir, skip_bad, allow_incomplete) -> Collection:
    """For commands that read every row (info, verify): the whole index is checked first,
    and one found damaged (the check removes it) is built again, once, so that the command
    reports on the archives, not a unit of the index per row."""
    collection = _open(sources, index_dir, skip_bad=skip_bad, allow_incomplete=allow_incomplete)
    try:
        collection.tree.verify_all()
    except DamagedIndex:
        collection.close()
        return _open(sources, index_dir, skip_bad=skip_bad, allow_incomplete=allow_incomplete)
    return collection


class _Progress:
    """While an index is built, one terminal line: archives parsed, members so far and
    the time left (by archives: parsing them is most of a build). Nothing at all when
    standard error is not a terminal (logs and pipes get no control characters)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.members = 0
        self.shown = sys.stderr.isatty()
        self.written = False

    def __call__(self, name: str, members: int, done: int, total: int) -> None:
        if not self.shown:
            return
        self.members += members
        left = (time.monotonic() - self.started) / done * (total - done)
        line = f"indexing: {done}/{total} archives, {self.members:,} members" + \
            (f", about {left:.0f} s left" if done < total else ", merging")
        click.echo(f"\r{line:<79}", err=True, nl=False)
        self.written = True

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.written:
            click.echo("\r" + " " * 79 + "\r", err=True, nl=False)


def _engine(name: Optional[str]) -> Callable[..., None]:
    """The serve function of the chosen engine: native unless asked otherwise or not built.
    Each engine's module is imported only when it serves (mfusepy is not needed by C;
    importing it runs ``ldconfig -p`` to find libfuse, 30-60 ms of every mount)."""
    from . import nativefs

    if name != "python" and nativefs.available():
        return nativefs.serve
    if name == "native":
        raise click.ClickException(f"the native engine {nativefs.unavailable_reason()}")
    if name is None:
        click.echo(f"warning: serving with mfusepy, slower per request: the native engine "
                   f"{nativefs.unavailable_reason()}", err=True)
    from . import fs

    return fs.serve


def _read_password(path: Optional[str]) -> Optional[bytes]:
    """The first line of a password file, without its line ending."""
    if not path:
        return None
    with open(path, "rb") as f:
        return f.readline().rstrip(b"\r\n")


class _SourceType(click.ParamType):
    """A local folder or file, which must exist, or a URL (checked when it is opened)."""

    name = "source"
    _local = click.Path(exists=True)

    def convert(self, value, param, ctx):
        return value if is_url(value) else self._local.convert(value, param, ctx)


SOURCE = _SourceType()


class _RanksType(click.ParamType):
    """``--views``: all, none, or ranks joined by ',' or '+' (docs/views.md)."""

    name = "ranks"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return parse_ranks(str(value))
        except ValueError as err:
            self.fail(str(err), param, ctx)


views_option = click.option(
    "--views", type=_RanksType(), default="all", show_default=True, metavar="RANKS",
    help=f"Ranks shown in views/<rank>/<imgtype>/<split>/<label>/ (from the metadata CSV): all, none, "
         f"or some of {','.join(RANKS)} joined by ',' or '+'.")
common_source_options = [
    click.option("--index-dir", type=click.Path(file_okay=False), default=None,
                 help="Where the persistent indexes live [default: $XDG_CACHE_HOME/bioscanfs]."),
    click.option("--skip-bad", is_flag=True,
                 help="Leave out archives that cannot be opened or parsed, with a warning."),
    click.option("--allow-incomplete", is_flag=True, help="Leave out split archives with a missing piece."),
]


def _source_options(func: F) -> F:
    for option in reversed(common_source_options):
        func = option(func)
    return func


@click.group(cls=_Main)
@click.version_option(package_name="bioscanfs")
def main() -> None:
    """Mount BIOSCAN-5M zip packages read-only as the exact bioscan5m/ tree."""


@main.command()
@click.argument("sources", nargs=-1, required=True, type=SOURCE)
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("-f", "--foreground", is_flag=True, help="Stay attached; log to stderr.")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="FUSE mount options, e.g. allow_other (others cannot see the mount without it).")
@click.option("--cache-size", type=SIZE, default="256M", show_default=True,
              help="Bound on decompressed members kept in memory.")
@click.option("--log", "log_file", type=click.Path(dir_okay=False),
              help="Log file [default in daemon mode: INDEX_DIR/bioscanfs.log].")
@click.option("-v", "--verbose", count=True, help="More log detail (-vv for debug).")
@click.option("-s", "--single-threaded", is_flag=True,
              help="Serve requests on one thread (slower in scripts/bench.py; for debugging).")
@click.option("--engine", type=click.Choice(["native", "python"]),
              help="Request loop: native (C, libfuse 3) [default when built] or python (mfusepy).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False),
              help="Password for encrypted members (first line). In -f mode without it, you are asked.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Keep byte ranges fetched from URLs in this folder (may be shared by mounts).")
@click.option("--cache-max", type=SIZE, default="10G", show_default=True,
              help="Bound on --cache-dir; the least recently used ranges go first.")
@click.option("--cache-archives", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Native engine: read the archives through the page cache, 256 KiB around each read (yes), "
                   "or exactly each member (no); auto: yes when they fit in a quarter of the memory (or cgroup limit).")
@views_option
@_source_options
def mount(sources, mountpoint, foreground, options, cache_size, log_file, verbose, index_dir, skip_bad,
          allow_incomplete, single_threaded, engine, password_file, cache_dir, cache_max, cache_archives,
          views) -> None:
    """Mount the archives in SOURCES (folders, zip files or URLs) at MOUNTPOINT.

    Returns once the tree can be read; the filesystem keeps running in the background
    until `bioscanfs umount MOUNTPOINT`.
    """
    from .serving import mount_options, widen_readahead, widen_readahead_soon

    serve = _engine(engine)
    mountpoint = os.path.realpath(mountpoint)
    if is_mounted(mountpoint):
        raise click.ClickException(f"{mountpoint}: already a mount point (bioscanfs umount {mountpoint})")
    _setup_logging(verbose, None)
    if not foreground:
        if not log_file:   # the default log lives in the index folder: check whose it is first
            store.prepare_folder(index_dir or default_index_dir())
            log_file = os.path.join(index_dir or default_index_dir(), "bioscanfs.log")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            open(log_file, "ab").close()
        except OSError as err:
            raise click.ClickException(
                f"{log_file}: cannot write the log ({err.strerror}); choose one with --log FILE") from None
    password = _read_password(password_file)
    # The daemon is forked from this process: a missing index is built in a child of it (Collection)
    collection = _open(sources, index_dir, cache_size, skip_bad, allow_incomplete, password,
                       cache_dir and os.path.abspath(cache_dir), cache_max, views, build_apart=True)
    if password is None and foreground and sys.stdin.isatty() and collection.encrypted_members():
        collection.reader.password = click.prompt(
            f"{collection.encrypted_members()} members are encrypted; password", hide_input=True,
            default="", show_default=False).encode() or None
    for line in collection.warnings[:20]:
        click.echo(f"warning: {line}", err=True)
    conflicts = collection.tree.conflicts
    if conflicts:
        examples = "; ".join(c.path for c in conflicts[:3])
        click.echo(f"warning: {len(conflicts)} paths differ between archives (first archive wins), e.g. {examples}; "
                   "see `bioscanfs info`", err=True)
    fuse_options = mount_options(list(options), mount_helper.source_name(sources))

    def announce() -> None:
        log.info("mounted %d files from %d archives at %s", collection.tree.n_files,
                 len(collection.sources), mountpoint)

    _tune_heap()
    engine_options = dict(threads=not single_threaded, cache_archives={"yes": True, "no": False}.get(cache_archives))
    if foreground:
        _setup_logging(verbose, log_file)
        serve(collection, mountpoint, fuse_options, on_ready=lambda: (widen_readahead_soon(mountpoint), announce()),
              **engine_options)
        return
    _daemonize(lambda ready: serve(collection, mountpoint, fuse_options, **engine_options,
                                   on_ready=lambda: (announce(), ready())),
               verbose, log_file)
    widen_readahead(mountpoint)   # before returning, so that the mount's readahead is set when it is used
    click.echo(f"mounted {collection.tree.n_files} files from {len(collection.sources)} archives at {mountpoint}")
    click.echo(f"log: {log_file}; unmount with: bioscanfs umount {mountpoint}")
    _leave_now()


def _daemonize(run: Callable[[Callable[[], None]], None], verbose: int, log_file: str) -> None:
    """Fork a detached server; return in the parent once it reports the mount ready.

    Whatever fails in the child, from redirecting its output on, reaches the parent as one
    line through the pipe (never a traceback on the terminal)."""
    pid, pipe = fork_with_pipe()
    if pid == 0:
        def ready() -> None:
            os.write(pipe, b"ok")
            os.close(pipe)

        code = 1
        try:
            os.setsid()
            _detach_output(verbose, log_file)
            run(ready)
            code = 0
        except BaseException as err:  # reported to the parent, which shows it to the user
            log.error("mount failed: %s", err)
            try:
                os.write(pipe, f"mount failed: {err}; see {log_file}".encode())
            except OSError:
                pass
        os._exit(code)
    waiting = select.poll()  # not select(): the pipe may be past descriptor 1023, after many archives
    waiting.register(pipe, select.POLLIN)
    message = os.read(pipe, 4096).decode(errors="replace") if waiting.poll(READY_TIMEOUT * 1000) else ""
    os.close(pipe)
    if message != "ok":
        raise click.ClickException(message or f"the filesystem did not become ready; see {log_file}")


def _leave_now() -> None:
    """End the daemon's parent at once, its output flushed: the daemon holds the mount, and
    the interpreter's teardown (the tree's tables freed, the modules' state) cost 0.06-0.17 s
    of every mount command, a third of a warm remount."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _detach_output(verbose: int, log_file: str) -> None:
    """The daemon's stdin from /dev/null; its log, stdout and stderr to ``log_file``."""
    _setup_logging(verbose, log_file)
    with open(os.devnull, "rb") as null_in, open(log_file, "ab") as log_out:
        os.dup2(null_in.fileno(), 0)
        os.dup2(log_out.fileno(), 1)
        os.dup2(log_out.fileno(), 2)


#: glibc's M_ARENA_MAX. The server's threads share one heap per core (glibc's default is
#: eight per core): no more heaps than can be busy at once, so the C engine's threads,
#: which allocate without the GIL, still scale with the cores.
_M_ARENA_MAX = -8


def _tune_heap() -> None:
    """Give the heap freed after a cold index build back to the system (pyarrow's pool,
    which the views' build filled, and glibc's), so the server does not start with the
    builder's high-water mark (a cold mount with views left it 716 MB); and let its threads share
    one heap per core. With a heap per worker thread, each keeps the 1 MiB buffers of the
    reads it answered (the soak test, 2 cores: +79-109 MB after warm-up; +44-67 MB with 2).
    Python allocates under the GIL, so sharing costs little. Mapping big buffers on their
    own instead (M_MMAP_THRESHOLD 256 KiB) grew it least (+21-26 MB) but halved the CSV
    stream (0.49-0.60 of zipfile), each buffer paying its page faults again."""
    if "pyarrow" in sys.modules:   # imported only to build views
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
        libc.mallopt(_M_ARENA_MAX, max(2, os.cpu_count() or 1))
    except (OSError, AttributeError):
        pass


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", is_flag=True, help="If it is busy, detach it now; it goes once its files are closed.")
def umount(mountpoint, lazy) -> None:
    """Unmount the bioscanfs mount at MOUNTPOINT, including a stale one whose process has
    died. Anything else mounted there is left alone."""
    from .serving import SUBTYPE

    point = os.path.realpath(mountpoint)
    mounts = mounts_at(point)
    if not mounts:
        raise click.ClickException(f"{point}: not mounted")
    top = mounts[-1]
    if top.fstype != f"fuse.{SUBTYPE}":
        raise click.ClickException(f"{point}: not a bioscanfs mount ({top.fstype} from {top.source}); left alone")
    failure = _unmount(point, lazy)
    deadline = time.monotonic() + 10
    while not failure and top in mounts_at(point):
        if time.monotonic() > deadline:
            failure = "still mounted"
        time.sleep(0.05)
    if failure:
        hint = "; close the files open in it, or give --lazy" if "busy" in failure and not lazy else ""
        raise click.ClickException(f"{point}: cannot unmount: {failure}{hint}")
    click.echo(f"unmounted {point}")


def _unmount(point: str, lazy: bool) -> str:
    """Try the unmount commands in turn: '' once one succeeds, else the last error.

    Lazy detaching (``-z``, ``-l``) only when asked: it hides a busy mount from new users
    while its open files keep it, and the server, alive."""
    attempts: List[List[str]] = [["fusermount3", "-u", point], ["fusermount", "-u", point], ["umount", point]]
    if lazy:
        attempts += [["fusermount3", "-uz", point], ["fusermount", "-uz", point], ["umount", "-l", point]]
    failure = "no fusermount3, fusermount or umount found"
    for command in attempts:
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except FileNotFoundError:
            continue
        if done.returncode == 0:
            return ""
        failure = done.stderr.strip().rstrip(".") or f"{command[0]} exited with {done.returncode}"
    return failure


@main.command()
@click.argument("sources", nargs=-1, required=True, type=SOURCE)
@views_option
@_source_options
def index(sources, index_dir, skip_bad, allow_incomplete, views) -> None:
    """Build the persistent indexes of SOURCES ahead of the first mount."""
    from .discover import find_archives

    folder = index_dir or default_index_dir()
    _check_writable(folder)
    _setup_logging(0, None)
    specs, warnings = find_archives(sources, allow_incomplete)
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    started = time.monotonic()
    with _Progress() as progress:
        tree, kept = open_tree(specs, folder, skip_bad, allow_incomplete, on_archive=progress, views=views)
    for src in kept:
        src.close()
    if not tree.persisted:
        raise click.ClickException(f"{folder}: the index was not kept there (not written, or not readable "
                                   "once written); every mount will build it again")
    click.echo(f"indexed {tree.n_files} files in {tree.n_dirs} folders from {len(kept)} archives "
               f"in {time.monotonic() - started:.1f} s -> {folder}")


def _check_writable(folder: str) -> None:
    """Fail before any archive is read when the index folder cannot take a file."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise click.ClickException(f"{folder}: cannot write the index there ({err.strerror}); "
                                   "choose a folder with --index-dir") from None


@main.command()
@click.argument("sources", nargs=-1, required=True, type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_source_options
def info(sources, as_json, index_dir, skip_bad, allow_incomplete) -> None:
    """Show each package in SOURCES: splits with member counts and bytes, archives,
    compression methods, duplicates and conflicts."""
    from .report import describe, render

    with _open_checked(sources, index_dir, skip_bad, allow_incomplete) as collection:
        report = describe(collection)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


@main.command(name="ls")
@click.argument("zipdir", type=SOURCE)
@click.argument("path", default="")
@click.option("-l", "long", is_flag=True, help="Show size and mtime.")
@_source_options
def ls_(zipdir, path, long, index_dir, skip_bad, allow_incomplete) -> None:
    """List PATH (default: the root) of the tree in ZIPDIR, without mounting."""
    with _open([zipdir], index_dir, skip_bad=skip_bad, allow_incomplete=allow_incomplete) as collection:
        node = collection.node(path)
        names = collection.listdir(path) if node < 0 else [path.rstrip("/").rpartition("/")[2]]
        for name in names:
            if not long:
                click.echo(name)
                continue
            st = collection.stat(f"{path}/{name}" if node < 0 else path)
            kind = "d" if st.mode & 0o040000 else "-"
            stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(st.mtime))
            click.echo(f"{kind} {st.size:>12} {stamp} {name}")


@main.command()
@click.argument("zipdir", type=SOURCE)
@click.argument("path")
@_source_options
def cat(zipdir, path, index_dir, skip_bad, allow_incomplete) -> None:
    """Write the member at PATH in ZIPDIR to stdout, without mounting."""
    out = click.get_binary_stream("stdout")
    with _open([zipdir], index_dir, skip_bad=skip_bad, allow_incomplete=allow_incomplete) as collection, \
            collection.open(path) as member:
        while chunk := member.read(1 << 20):
            out.write(chunk)


@main.command()
@click.argument("sources", nargs=-1, required=True, type=SOURCE)
@click.option("--sample", type=click.IntRange(min=1), help="Check only N members picked at random.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=os.cpu_count() or 1, show_default=True,
              help="Members checked in parallel.")
@_source_options
def verify(sources, sample, jobs, index_dir, skip_bad, allow_incomplete) -> None:
    """Check the CRC-32 of every member in SOURCES; list the bad ones and exit 1 if any."""
    from .report import verify_members

    with _open_checked(sources, index_dir, skip_bad, allow_incomplete) as collection:
        total = collection.tree.n_files
        with click.progressbar(length=min(sample or total, total), label="verifying", file=sys.stderr,
                               show_eta=True, show_percent=True, show_pos=True) as bar:
            bad, checked = verify_members(collection, sample, jobs, on_done=bar.update)
    for line in bad:
        click.echo(f"BAD {line}")
    click.echo(f"{checked} members checked, {len(bad)} bad")
    if bad:
        sys.exit(1)


@main.command()
@click.argument("processids", nargs=-1)
@click.option("--split", type=click.Choice(SPLITS), help="Split of the processids (or a 'split' CSV column).")
@click.option("--imgtype", type=click.Choice(IMGTYPES), default="cropped_256", show_default=True)
@click.option("--zips", type=click.Path(exists=True), help="Also check that each member exists in these zips.")
@click.option("--csv", "from_csv", is_flag=True,
              help="Read processids from stdin: a CSV with a 'processid' (and optional 'split') column, "
                   "or one processid per line.")
@_source_options
def path(processids, split, imgtype, zips, from_csv, index_dir, skip_bad, allow_incomplete) -> None:
    """Print the member path of each PROCESSID by the md5 chunk rule."""
    from .layout import image_path
    from .report import read_processids

    pairs = [(pid, split) for pid in processids]
    if from_csv:
        try:
            pairs += read_processids(click.get_binary_stream("stdin").read(), split)
        except ValueError as err:
            raise click.ClickException(f"stdin: {err}") from None
    if not pairs:
        raise click.UsageError("give PROCESSIDs or --csv")
    collection = _open([zips], index_dir, skip_bad=skip_bad, allow_incomplete=allow_incomplete) if zips else None
    missing = 0
    for pid, pid_split in pairs:
        if not pid_split:
            raise click.UsageError(f"{pid}: no split; give --split or a 'split' CSV column")
        try:
            member = image_path(pid, pid_split, imgtype)
        except ValueError as err:  # a split from the CSV that is not one of the dataset's
            raise click.ClickException(f"{pid}: {err}") from None
        if collection is not None:
            try:
                collection.node(member)
            except BioscanError:
                click.echo(f"missing: {member}", err=True)
                missing += 1
                continue
        click.echo(member)
    if missing:
        sys.exit(1)
