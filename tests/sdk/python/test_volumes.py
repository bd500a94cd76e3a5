"""Volumes (`e2b.Volume`) with the official SDK: create, list, get_info, connect, destroy; the
content API behind each volume's token (write_file and read_file as text, bytes and a stream,
make_dir with force, list with depth, update_metadata, exists, remove) and its refusals; and a
volume mounted in sandboxes, which keeps its files from one sandbox to the next and cannot be
destroyed while one mounts it.

The SDK reaches the content API at E2B_VOLUME_API_URL (tests/sdk/run.sh points it at the
server). Everything but the mount test needs only the control API."""

import io
import os
import uuid

import httpx
import pytest
from e2b import Sandbox, Volume
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    VolumeException,
    VolumeNotFoundException,
    VolumePathNotFoundException,
)

from conftest import TEMPLATE

API = os.environ.get("E2B_API_URL", "")
HEADERS = {"X-API-KEY": os.environ.get("E2B_API_KEY", "")}


@pytest.fixture
def volume():
    vol = Volume.create(f"t-{uuid.uuid4().hex[:12]}")
    try:
        yield vol
    finally:
        Volume.destroy(vol.volume_id)


@pytest.mark.control
def test_create_list_get_info_connect_destroy():
    name = f"t-{uuid.uuid4().hex[:12]}"
    vol = Volume.create(name)
    try:
        assert vol.name == name
        assert vol.volume_id.startswith("vol_")
        assert vol.token and vol.token.startswith("vtok_")

        listed = {v.volume_id: v.name for v in Volume.list()}
        assert listed[vol.volume_id] == name

        info = Volume.get_info(vol.volume_id)
        assert (info.volume_id, info.name, info.token) == (vol.volume_id, name, vol.token)
        assert info.domain is None

        # connect: the same volume, and its token opens the content API.
        same = Volume.connect(vol.volume_id)
        assert (same.volume_id, same.name, same.token) == (vol.volume_id, name, vol.token)
        vol.write_file("/hello.txt", "from the first handle")
        assert same.read_file("/hello.txt") == "from the first handle"

        # Names are unique in the team; the refusal says what to do.
        with pytest.raises(VolumeException) as e:
            Volume.create(name)
        assert "409" in str(e.value) and "Connect to it" in str(e.value)
        with pytest.raises(VolumeException) as e:
            Volume.create("not a valid name!")
        assert "400" in str(e.value) and "1-64" in str(e.value)
    finally:
        assert Volume.destroy(vol.volume_id) is True
    assert vol.volume_id not in {v.volume_id for v in Volume.list()}
    assert Volume.destroy(vol.volume_id) is False
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(vol.volume_id)
    # The old handle's token now finds no volume.
    with pytest.raises(NotFoundException):
        vol.read_file("/hello.txt")


@pytest.mark.control
def test_files_as_text_bytes_and_streams(volume):
    entry = volume.write_file("/notes.txt", "héllo")
    assert (entry.name, entry.type.value, entry.path) == ("notes.txt", "file", "/notes.txt")
    assert entry.size == len("héllo".encode())
    assert entry.mode == 0o644
    assert entry.mtime.tzinfo is not None
    assert volume.read_file("/notes.txt") == "héllo"
    assert volume.read_file("/notes.txt", format="bytes") == "héllo".encode()

    blob = bytes(range(256)) * 4096  # 1 MiB, over the REST body limit
    volume.write_file("/blob.bin", io.BytesIO(blob))
    assert volume.read_file("/blob.bin", format="bytes") == blob
    assert b"".join(volume.read_file("/blob.bin", format="stream")) == blob

    volume.write_file("/empty", b"")
    assert volume.read_file("/empty") == ""
    assert b"".join(volume.read_file("/empty", format="stream")) == b""

    # Overwrites: by default and with force; force=False refuses an existing file.
    volume.write_file("/notes.txt", "v2")
    volume.write_file("/notes.txt", "v3", force=True)
    assert volume.read_file("/notes.txt") == "v3"
    with pytest.raises(VolumeException) as e:
        volume.write_file("/notes.txt", "v4", force=False)
    assert "409" in str(e.value)
    assert volume.read_file("/notes.txt") == "v3"

    # Mode and owner of a new file.
    entry = volume.write_file("/script.sh", "#!/bin/sh\n", mode=0o755, uid=1000, gid=1000)
    assert entry.mode == 0o755
    info = volume.get_info("/script.sh")
    assert (info.type.value, info.mode) == ("file", 0o755)


@pytest.mark.control
def test_directories_listing_metadata_and_removal(volume):
    d = volume.make_dir("/dir")
    assert (d.name, d.type.value, d.path) == ("dir", "directory", "/dir")
    with pytest.raises(VolumeException):
        volume.make_dir("/dir")
    volume.make_dir("/dir", force=True)
    with pytest.raises(VolumePathNotFoundException):
        volume.make_dir("/a/b/c")
    deep = volume.make_dir("/a/b/c", force=True, mode=0o700)
    assert deep.mode & 0o777 == 0o700
    volume.write_file("/a/b/c/file.txt", "deep")
    volume.write_file("/dir/one.txt", "1")

    assert sorted(e.path for e in volume.list("/")) == ["/a", "/dir"]
    assert sorted(e.path for e in volume.list("/", depth=2)) == [
        "/a",
        "/a/b",
        "/dir",
        "/dir/one.txt",
    ]
    assert sorted(e.path for e in volume.list("/a", depth=3)) == [
        "/a/b",
        "/a/b/c",
        "/a/b/c/file.txt",
    ]
    with pytest.raises(VolumePathNotFoundException):
        volume.list("/nope")

    updated = volume.update_metadata("/dir/one.txt", mode=0o600)
    assert (updated.path, updated.mode) == ("/dir/one.txt", 0o600)
    assert volume.get_info("/dir/one.txt").mode == 0o600
    with pytest.raises(NotFoundException):
        volume.update_metadata("/nope.txt", mode=0o644)

    assert volume.exists("/dir/one.txt") is True
    assert volume.exists("/nope.txt") is False
    volume.remove("/dir/one.txt")
    assert volume.exists("/dir/one.txt") is False
    volume.remove("/a")
    assert volume.exists("/a/b/c/file.txt") is False
    with pytest.raises(VolumePathNotFoundException):
        volume.remove("/a")
    with pytest.raises(VolumePathNotFoundException):
        volume.read_file("/a/b/c/file.txt")


@pytest.mark.control
def test_paths_and_tokens_are_checked(volume):
    for bad in ["../x", "/../../etc/passwd", "/a/../../b"]:
        with pytest.raises(VolumeException) as e:
            volume.read_file(bad)
        assert "400" in str(e.value) and "'..'" in str(e.value), str(e.value)
        with pytest.raises(VolumeException):
            volume.write_file(bad, "x")

    # Another volume's token, or a made-up one, opens nothing.
    other = Volume.create(f"t-{uuid.uuid4().hex[:12]}")
    try:
        other.write_file("/mine.txt", "other's")
        for token in [other.token, "vtok_" + "0" * 64]:
            thief = Volume(volume.volume_id, volume.name, token=token)
            with pytest.raises(AuthenticationException):
                thief.list("/")
        # The right volume id with its own token still works.
        assert other.read_file("/mine.txt") == "other's"
    finally:
        Volume.destroy(other.volume_id)

    # Without any token the content API answers 401 in E2B's error shape.
    r = httpx.get(
        f"{os.environ['E2B_VOLUME_API_URL']}/volumecontent/{volume.volume_id}/path",
        params={"path": "/"},
        timeout=30,
    )
    assert r.status_code == 401
    assert r.json()["code"] == 401 and "Bearer" in r.json()["message"]


def test_a_mounted_volume_keeps_its_files_across_sandboxes(volume):
    writer = Sandbox.create(TEMPLATE, timeout=120, volume_mounts={"/mnt/data": volume})
    try:
        assert writer.get_info().volume_mounts == [{"name": volume.name, "path": "/mnt/data"}]
        writer.files.write("/mnt/data/hello.txt", "written by the writer")
        # What a sandbox writes is in the volume's content API at once.
        assert volume.read_file("/hello.txt") == "written by the writer"
        volume.write_file("/from-api.txt", "written through the API")
        assert writer.files.read("/mnt/data/from-api.txt") == "written through the API"

        # Not destroyed while a sandbox mounts it; the refusal names the sandbox.
        with pytest.raises(VolumeException) as e:
            Volume.destroy(volume.volume_id)
        assert "409" in str(e.value) and writer.sandbox_id in str(e.value)
    finally:
        writer.kill()

    reader = Sandbox.create(TEMPLATE, timeout=120, volume_mounts={"/mnt/data": volume.name})
    try:
        assert reader.files.read("/mnt/data/hello.txt") == "written by the writer"
    finally:
        reader.kill()

    # A create naming a volume the team does not have is refused with what to do.
    with pytest.raises(Exception) as e:
        Sandbox.create(TEMPLATE, timeout=60, volume_mounts={"/mnt/x": "no-such-volume"})
    assert "Volume.create" in str(e.value)
