"""bioscanfs as the helper of mount(8): ``bioscanfs SOURCE MOUNTPOINT -o OPTIONS``.

Owns: recognising that call, turning its ``-o`` list into ``bioscanfs mount`` arguments,
and the source name the mount table shows. Knows nothing of archives or engines: the
flags it maps are read from the ``mount`` command itself, so a new ``bioscanfs mount``
flag (``--views`` one day) is an fstab option the day it exists, with nothing added here.

How the call arrives (util-linux 2.38 and libfuse 3.14, as in Debian 12; see
docs/system-mounts.md): ``mount -t fuse.bioscanfs SOURCE MOUNTPOINT -o OPTIONS``, or the
fstab line, finds no ``mount.fuse.bioscanfs`` and runs ``mount.fuse3``, which runs
``/bin/sh -c "'bioscanfs' 'SOURCE' 'MOUNTPOINT' -o 'OPTIONS'"`` with almost no
environment (no ``PATH``: the shell's default, which holds /usr/local/bin and /usr/bin;
``HOME=/root`` when unset). On the way, util-linux keeps its own options (``x-*``,
``nofail``, ``_netdev``, ``user``...; a ``user`` line adds ``nosuid,nodev,noexec``) and
mount.fuse3 drops a few more and adds ``dev`` and ``suid`` unless their ``no`` forms are
there. Whatever arrives, from mount(8) or from a person calling the helper form directly,
is sorted by ``mount_arguments``: our flags, options that mean nothing to a read-only
FUSE filesystem (accepted silently), and the rest, passed to FUSE.

Not supported: ``drop_privileges`` (mount.fuse3 mounts first and hands over
``/dev/fd/N`` as the mount point); a source named like a command (``ls``) must be
written as a path (``./ls``).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

import click

from .remote import is_url

#: Options accepted and dropped: mount(8) and fstab bookkeeping (util-linux and
#: mount.fuse3 drop most of these before we see them, a direct call may not), and the
#: ``rw``/``dev``/``suid``/``exec`` forms, which would only loosen a read-only mount of
#: 0444 files (``ro`` is always set; ``nodev``, ``nosuid``, ``noexec`` go to FUSE).
IGNORED = frozenset({
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser", "owner", "group",
    "rw", "ro", "dev", "suid", "exec",
})
#: Prefixes of options dropped the same way: ``x-systemd.automount``, ``x-mount.mkdir``,
#: ``x-gvfs-show``; ``comment=systemd.automount`` (the older spelling).
IGNORED_PREFIXES = ("x-", "comment=")


def is_helper_call(args: Sequence[str], commands: Sequence[str]) -> bool:
    """True for ``SOURCE MOUNTPOINT -o ...``: a first argument that is neither a command nor
    an option, and a ``-o`` (mount.fuse3 always gives one: it adds ``dev,suid`` or passes
    ``nodev,nosuid``), so that a mistyped command still gets click's "No such command"."""
    return (bool(args) and args[0] not in commands and not args[0].startswith("-")
            and any(arg.startswith("-o") for arg in args[1:]))


def mount_arguments(args: Sequence[str], mount: click.Command) -> List[str]:
    """The ``bioscanfs mount`` arguments for ``SOURCE MOUNTPOINT [-o OPTIONS]...``.

    Raises click.UsageError naming the option or argument it cannot take."""
    positional, options = _split_call(args)
    if len(positional) != 2:
        raise click.UsageError(f"as a mount helper: expected SOURCE MOUNTPOINT [-o OPTIONS], got {' '.join(args)}")
    ours, fuse = sort_options(options, mount)
    return ["mount", *ours, *(["-o", ",".join(fuse)] if fuse else []), "--", *positional]


def _split_call(args: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Positional arguments, and the items of every ``-o`` (mount(8) may add ``-v``: skipped)."""
    positional: List[str] = []
    options: List[str] = []
    rest = iter(args)
    for arg in rest:
        if arg == "-o":
            options += next(rest, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg != "-v":
            positional.append(arg)
    return positional, [item for item in options if item]


def sort_options(options: Sequence[str], mount: click.Command) -> Tuple[List[str], List[str]]:
    """``-o`` items as (``bioscanfs mount`` flags, options for FUSE); ignored ones in neither."""
    flags = mount_flags(mount)
    ours: List[str] = []
    fuse: List[str] = []
    for item in options:
        key, sep, value = item.partition("=")
        option = flags.get(key.replace("-", "_"))
        if option is not None:
            ours += _as_flags(option, value if sep else None, key)
        elif item not in IGNORED and not item.startswith(IGNORED_PREFIXES):
            fuse.append(item)
    return ours, fuse


def mount_flags(mount: click.Command) -> Dict[str, click.Option]:
    """The ``mount`` command's long flags by their ``-o`` key: ``--index-dir`` -> ``index_dir``."""
    return {name[2:].replace("-", "_"): param for param in mount.params if isinstance(param, click.Option)
            for name in param.opts if name.startswith("--")}


def _as_flags(option: click.Option, value: Optional[str], key: str) -> List[str]:
    """One ``-o`` item as command-line flags: ``skip_bad`` -> ``--skip-bad``,
    ``index_dir=D`` -> ``--index-dir=D``, ``verbose=2`` -> ``--verbose --verbose``."""
    name = next(n for n in option.opts if n.startswith("--"))
    if option.count:
        if value is not None and not value.isdigit():
            raise click.UsageError(f"-o {key}={value}: expected {key} or {key}=N")
        return [name] * (1 if value is None else int(value))
    if option.is_flag:
        if value is not None:
            raise click.UsageError(f"-o {key}={value}: {key} takes no value")
        return [name]
    if not value:
        raise click.UsageError(f"-o {key}: needs a value ({key}=...)")
    return [f"{name}={value}"]


def source_name(sources: Sequence[str]) -> str:
    """What the mount table shows as the source (``fsname``), in libfuse's option syntax.

    The folder or archive as an absolute path, or the URL without user, password, query
    or fragment (a signed URL's token must not land in the world-readable /proc/mounts);
    with several sources, the first and how many more (``/data/a.zip +2``)."""
    first = sources[0]
    if is_url(first):
        parts = urlsplit(first)
        first = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
    else:
        first = os.path.abspath(first)
    name = first + (f" +{len(sources) - 1}" if len(sources) > 1 else "")
    return name.replace("\\", "\\\\").replace(",", "\\,")
