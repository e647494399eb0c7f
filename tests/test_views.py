"""Taxonomic views (issue 18): views/<rank>/<imgtype>/<split>/<label>/<processid>.jpg and
views/<rank>/<imgtype>/classes.txt, on both engines, from a metadata CSV written here
with labels that hold spaces, '/', '%', commas and quotes, non-ASCII, '.' and '..', a
300-byte label, empty values, repeated processids, a processid without images and a
split that is not the dataset's. Every expected byte comes from zipfile.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest
from conftest import (
    MountFactory,
    copy_archives,
    data_offset,
    edit_headers,
    expected_tree,
    flip_byte,
    load_script,
    prebuild_index,
    walk_mount,
    zip_contents,
    zip_members,
)
from test_index import assert_same_tree, load
from test_tampered import flip, read_tree, served_or_eio, tampered

from bioscanfs import Collection, mount_helper, nativefs
from bioscanfs.cli import main as cli_main
from bioscanfs.layout import CSV_COLUMNS, IMGTYPES, METADATA_CSV, METADATA_ZIP, chunk_of, image_path
from bioscanfs.reader import Reader
from bioscanfs.sources import open_sources
from bioscanfs.tree import BadTables, check
from bioscanfs.views import RANKS, label_name, label_of, parse_ranks, piped
from bioscanfs.zipdir import Member, read_members

#: Labels given out in turn, rank by rank ("" leaves a row out of that rank's view).
POOL = ["Diptera", "Aphis gossypii", "a/b", "Ürümqi ñandú", " spaced ", ".", "..", "50%", "x" * 300,
        'comma, "quoted"', "", "Diptera"]
#: torchvision's IMG_EXTENSIONS.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CSV_WARNING = rf"{METADATA_ZIP}: {METADATA_CSV}: no views/: the CSV cannot be read"

Labels = Dict[str, Dict[str, str]]   # processid -> rank -> label (the row that wins)


def _row(pid: str, split: str, labels: Dict[str, str]) -> List[str]:
    values = dict.fromkeys(CSV_COLUMNS, "")
    values.update(labels, processid=pid, split=split, chunk=chunk_of(pid, split) if split in _SPLITS else "")
    return [values[c] for c in CSV_COLUMNS]


_SPLITS = {"pretrain", "train", "val", "test", "val_unseen", "test_unseen", "key_unseen", "other_heldout"}


def write_csv(folder: Path, text: str, method: int = zipfile.ZIP_STORED) -> None:
    """Replace the metadata zip with one holding this CSV, stored by default (tests flip its bytes)."""
    with zipfile.ZipFile(folder / METADATA_ZIP, "w", method) as zf:
        zf.writestr(METADATA_CSV, text)


def write_metadata(folder: Path, splits: Dict[str, str]) -> Labels:
    """A metadata CSV that labels every image, then repeats five processids with other
    labels, and adds a row without images, one of an unknown split, and for every image a
    row whose file name starts with the image's, in the image's folder (``pid.jpgX``: no
    image; a join that compared names only as long as the folder's longest finds one)."""
    labels: Labels = {}
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for i, pid in enumerate(sorted(splits)):
        labels[pid] = {rank: POOL[(i + 3 * k) % len(POOL)] for k, rank in enumerate(RANKS)}
        writer.writerow(_row(pid, splits[pid], labels[pid]))
    for pid in sorted(splits)[:5]:
        writer.writerow(_row(pid, splits[pid], dict.fromkeys(RANKS, "Repeated")))
    writer.writerow(_row("NOIMAGE1-24", "train", dict.fromkeys(RANKS, "Nowhere")))
    writer.writerow(_row(sorted(splits)[0], "weird", dict.fromkeys(RANKS, "Weird")))
    for pid in sorted(splits):
        longer = _row(pid + ".jpgX", splits[pid], dict.fromkeys(RANKS, "Nowhere"))
        longer[CSV_COLUMNS.index("chunk")] = chunk_of(pid, splits[pid])
        writer.writerow(longer)
    write_csv(folder, out.getvalue())
    return labels


@pytest.fixture(scope="module")
def views_set(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> Tuple[Path, Dict[str, str], Labels]:
    """All four imgtypes and a metadata zip of our own: (folder, processid -> split, labels),
    indexed once for the views the tests below mount it with (a mount with others builds)."""
    folder = tmp_path_factory.mktemp("views_set")
    summary = make_fake.make_set(folder, images=64, deflate_fraction=0.4, seed=3)
    labels = write_metadata(folder, summary["splits"])
    index_dir = tmp_path_factory.mktemp("views_index")
    for ranks in ("all", "species", "order+species", "dna_bin,genus", "none"):
        prebuild_index([folder], index_dir, parse_ranks(ranks))
    return folder, summary["splits"], labels


def expected_views(splits: Dict[str, str], labels: Labels, ranks=RANKS) -> Dict[str, str]:
    """View path -> the image member it shows, for every labelled row."""
    return {f"views/{rank}/{imgtype}/{splits[pid]}/{label_name(labels[pid][rank].encode()).decode()}/{pid}.jpg":
            image_path(pid, splits[pid], imgtype)
            for pid in splits for rank in ranks for imgtype in IMGTYPES if labels[pid][rank]}


def expected_classes(splits: Dict[str, str], labels: Labels, rank: str) -> bytes:
    names = sorted({label_name(labels[pid][rank].encode()) for pid in splits if labels[pid][rank]})
    return b"".join(name + b"\n" for name in names)


def view_files(root: Path) -> Set[str]:
    """Every file under views/ as the kernel lists it, classes.txt aside."""
    tree = walk_mount(root / "views")
    return {f"views/{folder}/{name}" for folder, names in tree.items() for name in names
            if not (root / "views" / folder / name).is_dir() and name != "classes.txt"}


def test_every_labelled_row_once_with_its_image_bytes(views_set, mount: MountFactory, engine: str) -> None:
    """Same bytes, size and mtime as the image; on the native engine also the same inode (a
    hard link: one page cache). The python engine's inodes are libfuse's, one per path."""
    folder, splits, labels = views_set
    live = mount(folder, args=["--views", "all"])
    expected = expected_views(splits, labels)
    members = zip_members(folder)
    some = sorted(expected)[::97]   # found by name (LOOKUP), before any listing shows them
    assert [live.path(view).read_bytes() for view in some] == [members[expected[v]].read() for v in some]
    assert view_files(live.point) == set(expected)   # each labelled row once; unlabelled, missing, repeats never
    contents = zip_contents({image: members[image] for image in set(expected.values())})
    for view, image in expected.items():
        assert live.path(view).read_bytes() == contents[image], view
        seen, real = os.stat(live.path(view)), os.stat(live.path(image))
        assert (seen.st_size, seen.st_mtime) == (real.st_size, real.st_mtime), view
        assert engine != "native" or seen.st_ino == real.st_ino, view
    assert walk_mount(live.point / "bioscan5m") == expected_tree(p[len("bioscan5m/"):] for p in members)


def test_classes_txt_lists_the_labels_of_every_split(views_set, mount: MountFactory) -> None:
    folder, splits, labels = views_set
    live = mount(folder, args=["--views", "all"])
    for rank in RANKS:
        for imgtype in IMGTYPES:
            classes = live.path(f"views/{rank}/{imgtype}/classes.txt").read_bytes()
            assert classes == expected_classes(splits, labels, rank), (rank, imgtype)
            folders = {name for split in os.listdir(live.path(f"views/{rank}/{imgtype}"))
                       if split != "classes.txt" for name in os.listdir(live.path(f"views/{rank}/{imgtype}/{split}"))}
            assert folders == set(classes.decode().splitlines())


def _imagefolder_replica(root: Path) -> Tuple[List[str], Dict[str, int]]:
    """torchvision's ImageFolder discovery: sorted class folders (scandir), then every file
    of an image extension below each, symlinks followed; -> (classes, files per class)."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    counts = {}
    for name in classes:
        found = [f for _, _, files in sorted(os.walk(root / name, followlinks=True)) for f in sorted(files)
                 if f.lower().endswith(IMG_EXTENSIONS)]
        counts[name] = len(found)
    return classes, counts


def test_imagefolder_discovery_on_species_train(views_set, mount: MountFactory) -> None:
    folder, splits, labels = views_set
    live = mount(folder, args=["--views", "species"])
    assert sorted(os.listdir(live.path("views"))) == ["species"]
    train = [pid for pid in splits if splits[pid] == "train" and labels[pid]["species"]]
    want: Dict[str, int] = {}
    for pid in train:
        name = label_name(labels[pid]["species"].encode()).decode()
        want[name] = want.get(name, 0) + 1
    for imgtype in IMGTYPES:
        root = live.path(f"views/species/{imgtype}/train")
        assert _imagefolder_replica(root) == (sorted(want), want)
        try:
            from torchvision.datasets import ImageFolder
        except ImportError:
            continue
        dataset = ImageFolder(str(root))
        assert dataset.classes == sorted(want) and len(dataset) == len(train)


def test_real_imagefolder(views_set, mount: MountFactory) -> None:
    pytest.importorskip("torchvision", reason="torchvision is not installed: the replica above stands in")
    folder, splits, labels = views_set
    live = mount(folder, args=["--views", "species"])
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(str(live.path("views/species/cropped_256/train")))
    assert len(dataset) == sum(1 for p in splits if splits[p] == "train" and labels[p]["species"])
    dataset[0][0].load()


def test_no_metadata_zip_no_views(views_set, mount: MountFactory, tmp_path: Path) -> None:
    folder, _, _ = views_set
    images = copy_archives(folder, tmp_path / "images",
                           [p.name for p in folder.glob("*.zip") if p.name != METADATA_ZIP])
    live = mount(images, args=["--views", "all"])
    assert os.listdir(live.point) == ["bioscan5m"]


def test_no_image_no_views(views_set, mount: MountFactory, tmp_path: Path) -> None:
    """The metadata zip mounted alone: no views/ (every view would be empty), and the CSV
    is not read for them (no plan logged); the CSV itself is served."""
    folder, _, _ = views_set
    metadata = copy_archives(folder, tmp_path / "metadata", [METADATA_ZIP])
    live = mount(metadata, args=["--views", "all", "-v"])
    assert os.listdir(live.point) == ["bioscan5m"]
    assert "views: " not in live.log_text()
    with zipfile.ZipFile(metadata / METADATA_ZIP) as zf:
        assert live.path(METADATA_CSV).read_bytes() == zf.read(METADATA_CSV)


@pytest.mark.parametrize("ranks, shown", [("none", []), ("order+species", ["order", "species"]),
                                          ("dna_bin,genus", ["dna_bin", "genus"])])
def test_views_option_picks_the_ranks(ranks: str, shown: List[str], views_set, mount: MountFactory) -> None:
    folder, splits, labels = views_set
    live = mount(folder, args=[f"--views={ranks}"])
    assert sorted(os.listdir(live.point)) == (["bioscan5m", "views"] if shown else ["bioscan5m"])
    if shown:
        assert sorted(os.listdir(live.path("views"))) == shown
        assert view_files(live.point) == set(expected_views(splits, labels, shown))


def _broken(folder: Path, how: str) -> None:
    """Make the metadata CSV unusable: a missing column, broken quoting, or a CRC that fails
    (stored: a flipped byte; deflated, which is inflated in one pass: a flipped byte, or a
    declared CRC that is not the bytes')."""
    csv_text = zipfile.ZipFile(folder / METADATA_ZIP).read(METADATA_CSV).decode()
    if how.startswith("deflated"):
        write_csv(folder, csv_text, zipfile.ZIP_DEFLATED)
        info = zipfile.ZipFile(folder / METADATA_ZIP).getinfo(METADATA_CSV)
        if how == "deflated-crc":
            edit_headers(folder / METADATA_ZIP, METADATA_CSV, crc32=info.CRC ^ 1)
        else:
            flip_byte(folder / METADATA_ZIP, data_offset(folder / METADATA_ZIP, info) + info.compress_size // 2, 0x01)
    elif how == "missing-column":
        write_csv(folder, csv_text.replace("species,", "speciez,", 1))
    elif how == "broken-quoting":
        lines = csv_text.splitlines(keepends=True)
        write_csv(folder, "".join(lines[:3] + ['AB1-20,"unterminated,' + lines[3]] + lines[4:]))
    else:
        with zipfile.ZipFile(folder / METADATA_ZIP) as zf:
            at = data_offset(folder / METADATA_ZIP, zf.getinfo(METADATA_CSV)) + len(csv_text) // 2
        flip_byte(folder / METADATA_ZIP, at, 0x01)


@pytest.mark.parametrize("how", ["missing-column", "broken-quoting", "crc", "deflated-flip", "deflated-crc"])
def test_unusable_csv_no_views_one_warning(how: str, views_set, mount: MountFactory, tmp_path: Path) -> None:
    folder = copy_archives(views_set[0], tmp_path / "set")
    _broken(folder, how)
    live = mount(folder, args=["--views", "all"])
    live.expect_log(CSV_WARNING)
    assert os.listdir(live.point) == ["bioscan5m"]
    members = {p: m for p, m in zip_members(folder).items() if p != METADATA_CSV}
    for path, data in zip_contents(members).items():
        assert live.path(path).read_bytes() == data, path
    warnings = [line for line in live.log_text().splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f"{folder / METADATA_ZIP}: {METADATA_CSV}: no views/" in warnings[0], warnings


def test_remount_reads_no_csv(views_set, tmp_path: Path, mount: MountFactory) -> None:
    """The views are in the index: a remount maps it and does not build again."""
    folder = copy_archives(views_set[0], tmp_path / "set")
    index_dir = tmp_path / "index"
    mount(folder, args=["--views", "all"], index_dir=index_dir)
    first = sorted(p.name for p in index_dir.glob("*.tree"))
    assert len(first) == 1   # the image tree it was built from is gone
    stamp = (index_dir / first[0]).stat().st_mtime_ns
    live = mount(folder, args=["--views", "all", "-v"], index_dir=index_dir)
    assert "views:" not in live.log_text()   # the plan's log line: no CSV read
    assert (index_dir / first[0]).stat().st_mtime_ns == stamp
    assert len(os.listdir(live.path("views"))) == len(RANKS)


@pytest.mark.no_c
@pytest.mark.parametrize("label, name", [
    ("Diptera", "Diptera"), ("Aphis gossypii", "Aphis gossypii"), ("a/b", "a%2Fb"), ("50%", "50%25"),
    (" spaced ", "%20spaced%20"), (".", "%2E"), ("..", "%2E%2E"), ("...", "..."), ("a\nb\rc\0", "a%0Ab%0Dc%00"),
    ("Ürümqi", "Ürümqi")])
def test_label_names(label: str, name: str) -> None:
    assert label_name(label.encode()) == name.encode()
    assert label_of(name.encode()) == label.encode()


@pytest.mark.no_c
def test_long_labels_are_cut_distinctly() -> None:
    first, second = ("é" * 200 + "a").encode(), ("é" * 200 + "b").encode()
    names = {label_name(first), label_name(second)}
    assert len(names) == 2 and all(len(n) <= 255 and b"%#" in n for n in names)
    assert all(n.decode() for n in names)   # never cut inside a character
    assert label_of(label_name(first)).decode() == "é" * 118


@pytest.mark.no_c
def test_ranks_option() -> None:
    assert parse_ranks("all") == RANKS and parse_ranks("none") == ()
    assert parse_ranks("species,order") == parse_ranks("order+species") == ("order", "species")
    with pytest.raises(ValueError, match="kingdom"):
        parse_ranks("order,kingdom")


@pytest.mark.no_c
def test_views_as_a_mount_option(tmp_path: Path) -> None:
    """``-o views=order+species`` (fstab, mount -t) becomes --views: ',' separates options there."""
    where = [str(tmp_path), str(tmp_path)]
    args = mount_helper.mount_arguments([*where, "-o", "allow_other,views=order+species"], cli_main.commands["mount"])
    assert args == ["mount", "--views=order+species", "-o", "allow_other", "--", *where]
    params = cli_main.commands["mount"].make_context("mount", args[1:]).params
    assert params["views"] == ("order", "species")


@pytest.fixture(scope="module")
def views_index(views_set, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection]:
    with Collection(str(views_set[0]), index_dir=str(tmp_path_factory.mktemp("index")), views=RANKS) as c:
        yield c


@pytest.mark.no_c
def test_collection_offers_the_views(views_set, views_index: Collection) -> None:
    folder, splits, labels = views_set
    expected = expected_views(splits, labels)
    assert {p for p in views_index.paths("views") if not p.endswith("/classes.txt")} == set(expected)
    view, image = sorted(expected.items())[0]
    assert views_index.read(view) == views_index.read(image)
    assert views_index.read("views/order/cropped/classes.txt") == expected_classes(splits, labels, "order")


@pytest.mark.parametrize("case", ["link-past-files", "link-runs-overlap", "link-runs-short"])
def test_bad_links_are_refused_by_python_and_by_c(case: str, views_index: Collection) -> None:
    tree = views_index.tree
    arrays = {name: np.array(array) for name, array in tree.arrays.items()}
    if case == "link-past-files":
        arrays["links"][-1] = len(arrays["files"])
    elif case == "link-runs-overlap":
        d = int(np.flatnonzero(arrays["link_hi"] > arrays["link_lo"])[0])
        arrays["link_lo"][d + 1] -= 1
    else:
        arrays["link_hi"][-1] -= 1
    sizes = [src.size for src in views_index.served]
    check({name: np.array(array) for name, array in tree.arrays.items()}, sizes)
    with pytest.raises(BadTables):
        check(arrays, sizes)
    fds = np.full(len(sizes), -1, np.int64)
    nativefs.check_tables(tree.arrays, fds, fds, sizes)
    with pytest.raises(ValueError, match="native engine"):
        nativefs.check_tables(arrays, fds, fds, sizes)


@pytest.mark.parametrize("case", ["flipped-bit", "link-past-files"])
def test_a_bad_link_is_found_when_first_read_and_never_served(case: str, views_set, tmp_path: Path,
                                                              mount: MountFactory) -> None:
    """``links`` is checked unit by unit on first use (small units and CRC blocks here: many
    of each). A flipped bit (its CRC left as it was) or a link past the files (CRCs valid):
    the mount starts without reading the links; the label folders and views that touch the
    bad unit get EIO, the others read right; the index is removed, the next mount builds
    it again and serves every view."""
    folder, splits, labels = views_set
    Collection(str(folder), index_dir=str(tmp_path / "built"), views=RANKS).close()
    (built,) = (tmp_path / "built").glob("*.tree")
    good = (built, *read_tree(built))
    if case == "link-past-files":
        links = good[2]["links"]
        links[len(links) // 2] = len(good[2]["files"])
    index_dir = tmp_path / "index"
    tampered(good, "", index_dir)
    tree_file = index_dir / built.name
    if case == "flipped-bit":
        flip(tree_file, "links")
    expected = expected_views(splits, labels)
    images = zip_contents({image: member for image, member in zip_members(folder).items()
                           if image in set(expected.values())})
    contents = {view: images[image] for view, image in expected.items()}
    listings = {d: names for d, names in expected_tree(expected).items() if d.count("/") == 4}  # label folders
    live = mount(folder, args=["--views", "all"], index_dir=index_dir)
    live.expect_log(r"is damaged")
    failed = served_or_eio(live, listings, contents)
    assert failed and len([path for path in failed if not path.endswith("/")]) < len(contents), failed
    assert f"index {tree_file} is damaged" in live.log_text()
    assert not tree_file.exists()
    again = mount(folder, args=["--views", "all"], index_dir=index_dir)
    assert served_or_eio(again, listings, contents) == []


def test_index_command_builds_what_mount_and_the_read_commands_map(views_set, tmp_path: Path,
                                                                     mount: MountFactory) -> None:
    """One index per folder: `index`, a default mount and ls, info, cat and verify all map
    the same file (none builds a second one without views)."""
    from conftest import run_cli

    folder = copy_archives(views_set[0], tmp_path / "set")
    index_dir = tmp_path / "index"
    done = run_cli("index", folder, "--index-dir", index_dir)
    assert done.returncode == 0, done.stderr
    built = {p.name: p.stat().st_mtime_ns for p in index_dir.glob("*.tree")}
    live = mount(folder, args=["--views", "all"], index_dir=index_dir)
    assert sorted(os.listdir(live.point)) == ["bioscan5m", "views"]
    classes = live.path("views/order/cropped_256/classes.txt").read_bytes()
    assert run_cli("ls", folder, "views", "--index-dir", index_dir).stdout.split() == sorted(RANKS)
    cat = run_cli("cat", folder, "views/order/cropped_256/classes.txt", "--index-dir", index_dir, binary=True)
    assert cat.stdout == classes
    for command in ("info", "verify"):
        assert run_cli(command, folder, "--index-dir", index_dir).returncode == 0, command
    assert {p.name: p.stat().st_mtime_ns for p in index_dir.glob("*.tree")} == built


@pytest.mark.no_c
def test_reindex_of_one_changed_archive_keeps_the_views(tmp_path: Path, bench_scale: ModuleType,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """With views, one changed image archive is the only one parsed again (the others' rows
    come from the views' tree), and the tree equals a fresh build."""
    bench_views = load_script("bench_views")
    folder, other = tmp_path / "set", tmp_path / "other"
    bench_scale.write_scale_set(folder, total=20_000, seed=0, packages=2)
    bench_views.write_csv(folder / METADATA_ZIP, bench_scale.scale_ids(20_000, 0))
    bench_scale.write_scale_set(other, total=20_000, seed=1, packages=2)
    zips, index_dir = sorted(folder.glob("*.zip")), tmp_path / "index"
    load(zips, index_dir, views=RANKS)
    changed = folder / "BIOSCAN_5M_cropped_256_train.zip"
    shutil.copyfile(other / changed.name, changed)
    with caplog.at_level(logging.INFO, logger="bioscanfs.index"):
        tree = load(zips, index_dir, views=RANKS)
    assert [r.getMessage() for r in caplog.records if "unchanged" in r.getMessage()] == \
        ["8 of 9 archives are unchanged since the last index: only the others are parsed"]
    assert_same_tree(tree, load(zips, None, views=RANKS))


@pytest.mark.no_c
def test_name_order_is_byte_order() -> None:
    """The sort of file names orders them as bytes, stably (ties keep row order), and
    flags each name equal to the one before it in that order; the names come in batches of
    other widths (as the CSV's blocks do), one batch or many."""
    import pyarrow as pa

    from bioscanfs.views import _name_order, _Names
    names = [b"ab.jpg", b"a.jpg", b"a\xff.jpg", b"B.jpg", b"\xc3\xa9.jpg", b"a.jpg", b"abcdefghijklmnopq.jpg",
             b"abcdefgh.jpg"]
    rng = np.random.default_rng(5)   # many 16-bit digits, odd lengths, shared heads, every byte
    drawn = [b"AB" * int(rng.integers(0, 3)) + rng.integers(0, 256, int(rng.integers(0, 20)), np.uint8).tobytes()
             for _ in range(3000)]
    nul = [b"a\0", b"a", b"a\0\0", b"a", b"a\0"]   # NUL pads: as long as the other, equal
    wide = [b"y" * 300 + b"b"] + names + [b"y" * 300 + b"a"]   # longer than a batch keeps padded
    for picked in (names, names * 3, [b"x" * 70] + names, wide, drawn + drawn[:500], nul, []):
        for size in (len(picked) or 1, 3, 1000):
            batches = [_Names.of(pa.array(picked[at:at + size], pa.binary()))
                       for at in range(0, len(picked), size)]
            order, repeated = _name_order(batches)
            assert order.tolist() == sorted(range(len(picked)), key=picked.__getitem__)
            assert repeated.tolist() == [picked[a] == picked[b] for a, b in zip(order[:-1], order[1:])]


@pytest.mark.no_c
def test_stable_order_of_folder_keys() -> None:
    """Folder keys (below 2**16, with a row number in 64 bits, or wider) are ordered as
    numpy's stable sort orders them."""
    from bioscanfs.views import _stable_order
    rng = np.random.default_rng(6)
    for top in (1, 300, 1 << 16, 70_000, 1 << 32, 1 << 40, 1 << 60):
        keys = rng.integers(0, top, 5000, dtype=np.int64)
        assert _stable_order(keys).tolist() == np.argsort(keys, kind="stable").tolist(), top


def test_a_views_folder_in_the_archives_wins(views_set, mount: MountFactory, tmp_path: Path) -> None:
    folder = copy_archives(views_set[0], tmp_path / "set")
    with zipfile.ZipFile(folder / "extra.zip", "w") as zf:
        zf.writestr("views/readme.txt", b"theirs\n")
    live = mount(folder, args=["--views", "all"])
    live.expect_log("no views/: the archives hold a views folder or file of their own")
    assert os.listdir(live.path("views")) == ["readme.txt"]
    assert live.path("views/readme.txt").read_bytes() == b"theirs\n"


@pytest.mark.no_c
def test_a_rank_with_no_label_has_an_empty_classes_txt(views_set, tmp_path: Path) -> None:
    """A rank no row labels (species, often, in a small set): its view folders hold only an
    empty classes.txt; the other ranks are as ever (the build used to fail on it)."""
    folder = copy_archives(views_set[0], tmp_path / "set")
    splits = views_set[1]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for pid in sorted(splits):
        writer.writerow(_row(pid, splits[pid], {"order": "Diptera"}))
    write_csv(folder, out.getvalue())
    with Collection(str(folder), index_dir=str(tmp_path / "index"), views=("order", "species")) as c:
        for imgtype in IMGTYPES:
            assert c.listdir(f"views/species/{imgtype}") == ["classes.txt"]
            assert c.read(f"views/species/{imgtype}/classes.txt") == b""
            assert c.read(f"views/order/{imgtype}/classes.txt") == b"Diptera\n"


def test_a_deflated_csv_gives_the_same_views(views_set, mount: MountFactory, tmp_path: Path) -> None:
    """A deflated CSV is inflated in one pass on a thread of its own (``Reader.copy_to``,
    ``views.piped``): the views are those of the stored one."""
    folder = copy_archives(views_set[0], tmp_path / "set")
    write_csv(folder, zipfile.ZipFile(folder / METADATA_ZIP).read(METADATA_CSV).decode(), zipfile.ZIP_DEFLATED)
    live = mount(folder, args=["--views", "all"])
    assert view_files(live.point) == set(expected_views(views_set[1], views_set[2]))


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_copy_to_through_a_pipe_gives_the_member(method: int, tmp_path: Path) -> None:
    """A member of many inflate pieces (40 MiB: streamed when stored) read whole through
    ``views.piped``, as the CSV reader takes it, equals zipfile's bytes."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 16, 40 << 20, dtype=np.uint8).tobytes()
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w", method) as zf:
        zf.writestr("m.csv", data)
    sources = open_sources([([str(archive)], False)])
    reader = Reader(sources)
    member = Member._make(read_members(sources[0]).table[0].item())
    with piped(lambda sink: reader.copy_to(member, "m.csv", sink)) as stream:
        assert stream.read() == zipfile.ZipFile(archive).read("m.csv")


def test_a_csv_piped_in_small_writes_parses_whole() -> None:
    """pyarrow's CSV reader takes a file's reads as its blocks: the pipe's reads must be
    whole (a raw pipe gives what is there, and a row across two short reads is refused)."""
    import pyarrow as pa

    from bioscanfs.views import NEEDED_COLUMNS, read_batches

    rows = 20_000
    text = ",".join(NEEDED_COLUMNS) + "\n" + "".join(
        f"P{i},{'x' * 300},f,s,g,sp,BOLD:{i},train,{i % 100:02d}\n" for i in range(rows))
    data = text.encode()

    def produce(sink) -> None:
        for at in range(0, len(data), 64):
            sink(data[at:at + 64])

    with piped(produce) as stream:
        table = pa.Table.from_batches(list(read_batches(stream)))
    assert table.num_rows == rows
    assert table.column("processid")[rows - 1].as_py() == f"P{rows - 1}".encode()


@pytest.mark.no_c
def test_a_csv_in_many_batches_plans_as_in_one(views_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CSV is planned batch by batch as it streams in (``views._Batch``): cut into many
    small blocks (labels, chunks and splits first seen in a later one, a processid repeated
    in another block), joined to the images in groups of a few blocks, the plan is that of
    one block joined at once, and every repeat is counted."""
    from bioscanfs import views
    from bioscanfs.collection import open_tree
    from bioscanfs.discover import find_archives

    folder = views_set[0]
    text = zipfile.ZipFile(folder / METADATA_ZIP).read(METADATA_CSV)
    specs, _ = find_archives([str(folder)])
    tree, kept = open_tree(specs, str(tmp_path), views=())
    try:
        one = views.plan(tree, lambda: io.BytesIO(text), RANKS, "csv", 0, block_size=len(text) + 1)
        monkeypatch.setattr(views, "_JOIN_ROWS", 40)
        many = views.plan(tree, lambda: io.BytesIO(text), RANKS, "csv", 0, block_size=2048)
    finally:
        for source in kept:
            source.close()
    assert len(text) > 10 * 2048
    seconds = ("csv_seconds", "plan_seconds")
    assert {k: v for k, v in many.stats.items() if k not in seconds} == \
        {k: v for k, v in one.stats.items() if k not in seconds}
    assert many.stats["processids_repeated"] == 6 and many.stats["csv_rows"] == len(views_set[1]) * 2 + 7
    assert (many.dirs, many.class_dirs, many.classes) == (one.dirs, one.class_dirs, one.classes)
    assert many.counts.tolist() == one.counts.tolist() and many.targets.tolist() == one.targets.tolist()
    assert len(many.targets) == sum(1 for pid in views_set[1] for rank in RANKS if views_set[2][pid][rank]) * 4


def test_leaving_piped_early_stops_its_producer() -> None:
    """A reader that stops before the end (pyarrow on a CSV it cannot parse) leaves the
    block at once, and the producer, stopped in its sink, ends: nothing waits forever."""
    import threading

    def produce(sink) -> None:
        while True:   # never ends by itself
            sink(b"x" * 4096)

    def read_a_little() -> None:
        with piped(produce) as stream:
            assert stream.read(10_000) == b"x" * 10_000

    reader = threading.Thread(target=read_a_little, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive()   # piped's block waits for the producer to end
