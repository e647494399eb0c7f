"""S3 sources: ``s3://`` archive URLs and bucket-prefix listings, against moto's S3 server.

moto's ThreadedMotoServer serves S3 on 127.0.0.1 (a free port); a small generated set is
uploaded with boto3. Credentials and the endpoint reach s3fs (botocore) through the
environment (AWS_ENDPOINT_URL_S3 ...), which mount subprocesses inherit. Expected bytes
come from zipfile on the local copy of the uploaded files.
"""
from __future__ import annotations

import socket
from pathlib import Path
from types import ModuleType
from typing import Dict, Iterator, NamedTuple

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

from conftest import MountFactory, assert_one_error_line, run_cli, zip_contents, zip_members, zip_paths  # noqa: E402

from bioscanfs import Collection  # noqa: E402

BUCKET = "bioscan-test"
PREFIX = "bioscan5m/zips"


class Bucket(NamedTuple):
    local: Path          #: the uploaded files, as local copies
    endpoint: str

    def url(self, name: str = "") -> str:
        return f"s3://{BUCKET}/{PREFIX}/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory, make_fake: ModuleType) -> Iterator[Bucket]:
    """A moto S3 server holding a small fake set under s3://BUCKET/PREFIX/ (plus a
    non-archive file and a deeper key, which a folder listing must skip)."""
    local = tmp_path_factory.mktemp("s3_set")
    make_fake.make_set(local, images=40, deflate_fraction=0.4, seed=1)
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint,
                                "AWS_ENDPOINT_URL": endpoint}.items():
                env.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
                env.delenv(name, raising=False)
            env.setenv("AWS_CONFIG_FILE", str(local / "absent-aws-config"))
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(local / "absent-aws-credentials"))
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            for path in zip_paths(local):
                client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.name}")
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/README.txt", Body=b"not an archive\n")
            client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/deeper/other.zip", Body=b"not listed")
            yield Bucket(local, endpoint)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_contents(s3: Bucket) -> Dict[str, bytes]:
    return zip_contents(zip_members(s3.local))


def test_prefix_listing_reads_every_member(s3: Bucket, s3_contents: Dict[str, bytes]) -> None:
    with Collection(s3.url(), index_dir=None) as collection:
        assert [s.name for s in collection.sources] == [s3.url(p.name) for p in zip_paths(s3.local)]
        assert set(collection.paths()) == set(s3_contents)
        for path, data in s3_contents.items():
            assert collection.read(path) == data, path


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_mount_of_an_s3_archive_serves_its_members(s3: Bucket, mount: MountFactory,
                                                    daemon: bool) -> None:
    name = "BIOSCAN_5M_cropped_256_train.zip"
    members = zip_members(s3.local)
    expected = {p: d for p, d in zip_contents(members).items() if members[p].archive.name == name}
    assert expected
    live = mount(s3.url(name), daemon=daemon)   # daemon: s3fs must work after the fork
    for path, data in expected.items():
        assert live.path(path).read_bytes() == data, path


# One engine: the mount is refused while opening the archives, before any engine serves.
def test_missing_key_is_one_clear_error_at_mount(s3: Bucket, tmp_path: Path, mountpoint: Path) -> None:
    url = s3.url("BIOSCAN_5M_absent.zip")
    done = run_cli("mount", url, mountpoint, "--index-dir", tmp_path / "index")
    assert_one_error_line(done, url)
    assert "not found" in done.stderr
