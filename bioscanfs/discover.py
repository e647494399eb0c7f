"""Turning folders and files into archives: standalone zips, raw byte splits, spanned sets.

Owns file-name conventions of split archives; knows nothing of member contents.

- ``NAME.zip`` and standalone parts ``NAME.01.zip``: one archive each.
- Raw byte splits ``NAME.zip.001``, ``.002``, ...: one archive, the pieces concatenated.
- Spanned sets ``NAME.z01``, ``.z02``, ..., ``NAME.zip``: one archive, one disk per piece.

Every zip in a folder is mounted, not only the BIOSCAN-5M package names, so re-packed
archives work too; ``info`` says which names it recognises. Folders are not searched
recursively. A URL names one archive or a remote folder (see remote.py); its file
names follow the same conventions.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .errors import SourceError
from .layout import PackageName, parse_package_name
from .remote import is_url, list_remote

_RAW_PIECE = re.compile(r"^(?P<stem>.+\.zip)\.(?P<n>\d{3})$", re.IGNORECASE)
_SPAN_PIECE = re.compile(r"^(?P<stem>.+)\.z(?P<n>\d{2,3})$", re.IGNORECASE)
_PART = re.compile(r"^(?P<stem>.+)\.(?P<n>\d{2,3})\.zip$", re.IGNORECASE)


class ArchiveSpec(NamedTuple):
    paths: List[str]                 #: pieces in order; one for a plain zip
    spanned: bool                    #: one disk per piece (else pieces are concatenated)
    package: Optional[PackageName]   #: what the name says, when it is a BIOSCAN-5M name

    @property
    def name(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} pieces)"


def find_archives(inputs: Sequence[str], allow_incomplete: bool = False) -> Tuple[List[ArchiveSpec], List[str]]:
    """All archives in the given folders and files, ordered by path, and warnings.

    A missing piece of a split or spanned archive raises SourceError naming the piece,
    unless ``allow_incomplete``, which skips that archive with a warning.
    """
    raw, spans, plain = _grouped(_listed_files(inputs))
    gaps = _Gaps(allow_incomplete)
    specs = _raw_specs(raw, gaps) + _spanned_specs(spans, plain, gaps)
    specs += [ArchiveSpec([path], False, parse_package_name(os.path.basename(path))) for path in plain]
    specs.sort(key=lambda spec: spec.paths[0])
    if not specs:
        raise SourceError(f"{', '.join(inputs)}: no zip archives found")
    return specs, gaps.warnings + _part_gaps(plain)


def _listed_files(inputs: Sequence[str]) -> List[str]:
    """The files named or held (not recursively) by the inputs, local ones made absolute."""
    files: List[str] = []
    for item in inputs:
        if is_url(item):
            files.extend(list_remote(item))
        elif os.path.isdir(item):
            files.extend(os.path.join(item, name) for name in sorted(os.listdir(item))
                         if os.path.isfile(os.path.join(item, name)))
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise SourceError(f"{item}: no such file or folder")
    return [f if is_url(f) else os.path.abspath(f) for f in files]


_Pieces = Dict[str, Dict[int, str]]


def _grouped(files: Sequence[str]) -> Tuple[_Pieces, _Pieces, List[str]]:
    """Raw byte-split pieces and spanned pieces by stem (piece number -> path), and plain
    ``.zip`` files (a spanned set's last piece among them); other files are ignored."""
    raw: _Pieces = {}
    spans: _Pieces = {}
    plain: List[str] = []
    for path in files:
        base = os.path.basename(path)
        if m := _RAW_PIECE.match(base):
            raw.setdefault(os.path.join(os.path.dirname(path), m["stem"]), {})[int(m["n"])] = path
        elif (m := _SPAN_PIECE.match(base)) and not base.lower().endswith(".zip"):
            spans.setdefault(os.path.join(os.path.dirname(path), m["stem"]), {})[int(m["n"])] = path
        elif base.lower().endswith(".zip"):
            plain.append(path)
    return raw, spans, plain


class _Gaps:
    """What to do about an archive with a missing piece: refuse, or skip it with a warning."""

    def __init__(self, allow_incomplete: bool) -> None:
        self.allow_incomplete = allow_incomplete
        self.warnings: List[str] = []

    def skip(self, message: str) -> None:
        if not self.allow_incomplete:
            raise SourceError(message + " (use --allow-incomplete to mount the rest)")
        self.warnings.append(message + "; skipping this archive")

    def complete(self, stem: str, pieces: Dict[int, str], piece_name: Callable[[int], str]) -> Optional[List[str]]:
        """The pieces in order, or None (after ``skip``) when one of 1..max is missing."""
        missing = [piece_name(n) for n in range(1, max(pieces) + 1) if n not in pieces]
        if not missing:
            return [pieces[n] for n in sorted(pieces)]
        self.skip(f"{os.path.basename(stem)}: missing piece {', '.join(missing)}")
        return None


def _raw_specs(raw: _Pieces, gaps: _Gaps) -> List[ArchiveSpec]:
    specs = []
    for stem, pieces in sorted(raw.items()):
        got = gaps.complete(stem, pieces, lambda n, s=stem: os.path.basename(s) + f".{n:03d}")
        if got:
            specs.append(ArchiveSpec(got, False, parse_package_name(os.path.basename(stem))))
    return specs


def _spanned_specs(spans: _Pieces, plain: List[str], gaps: _Gaps) -> List[ArchiveSpec]:
    """Spanned sets (``NAME.z01`` ... ``NAME.zip``); each set's ``.zip`` is taken out of
    ``plain``, also when the set is left out whole."""
    specs = []
    for stem, pieces in sorted(spans.items()):
        last = stem + ".zip"
        got = gaps.complete(stem, pieces, lambda n, s=stem: os.path.basename(s) + f".z{n:02d}")
        if last in plain:
            plain.remove(last)
            if got:
                specs.append(ArchiveSpec(got + [last], True, parse_package_name(os.path.basename(last))))
        elif got:
            gaps.skip(f"{os.path.basename(last)}: missing the last piece of a spanned set")
    return specs


def _part_gaps(paths: Sequence[str]) -> List[str]:
    """Warn when standalone parts skip a number (.01 and .03 present, .02 absent)."""
    parts: Dict[Tuple[str, int], List[int]] = {}
    for path in paths:
        if m := _PART.match(os.path.basename(path)):
            parts.setdefault((m["stem"], len(m["n"])), []).append(int(m["n"]))
    warnings = []
    for (stem, width), numbers in sorted(parts.items()):
        missing = [f"{stem}.{n:0{width}d}.zip" for n in range(1, max(numbers) + 1) if n not in numbers]
        if missing:
            warnings.append(f"{stem}: standalone part {', '.join(missing)} is absent; its members are not mounted")
    return warnings
