"""Files: write/read (text, bytes, stream), write many, list, exists, get_info, make_dir,
rename, remove, watch_dir. Needs real sandboxes."""

import time

from e2b import FileType, FilesystemEventType


def test_write_and_read_text_bytes_stream(sandbox):
    sandbox.files.write("/home/user/a.txt", "hello")
    assert sandbox.files.read("/home/user/a.txt") == "hello"
    payload = bytes(range(256)) * 1024
    sandbox.files.write("/home/user/b.bin", payload)
    assert sandbox.files.read("/home/user/b.bin", format="bytes") == payload
    streamed = b"".join(sandbox.files.read("/home/user/b.bin", format="stream"))
    assert streamed == payload


def test_write_many_list_exists_info(sandbox):
    sandbox.files.make_dir("/home/user/many")
    sandbox.files.write_files(
        [{"path": f"/home/user/many/{i}.txt", "data": str(i)} for i in range(5)]
    )
    names = sorted(e.name for e in sandbox.files.list("/home/user/many"))
    assert names == [f"{i}.txt" for i in range(5)]
    assert sandbox.files.exists("/home/user/many/3.txt")
    assert not sandbox.files.exists("/home/user/many/9.txt")
    info = sandbox.files.get_info("/home/user/many/3.txt")
    assert info.type == FileType.FILE and info.size == 1
    assert sandbox.files.get_info("/home/user/many").type == FileType.DIR


def test_rename_and_remove(sandbox):
    sandbox.files.write("/home/user/old.txt", "x")
    sandbox.files.rename("/home/user/old.txt", "/home/user/new.txt")
    assert not sandbox.files.exists("/home/user/old.txt")
    assert sandbox.files.read("/home/user/new.txt") == "x"
    sandbox.files.remove("/home/user/new.txt")
    assert not sandbox.files.exists("/home/user/new.txt")


def test_watch_dir_sees_create_write_remove(sandbox):
    sandbox.files.make_dir("/home/user/watched")
    handle = sandbox.files.watch_dir("/home/user/watched")
    try:
        sandbox.files.write("/home/user/watched/f.txt", "1")
        sandbox.files.remove("/home/user/watched/f.txt")
        kinds = set()
        deadline = time.time() + 10
        while time.time() < deadline and FilesystemEventType.REMOVE not in kinds:
            kinds |= {e.type for e in handle.get_new_events()}
            time.sleep(0.2)
    finally:
        handle.stop()
    assert FilesystemEventType.CREATE in kinds or FilesystemEventType.WRITE in kinds
    assert FilesystemEventType.REMOVE in kinds


def test_a_new_file_gives_create_chmod_write_as_in_e2b_also_recursively(sandbox):
    sandbox.files.make_dir("/home/user/w3/sub")
    handle = sandbox.files.watch_dir("/home/user/w3", recursive=True)
    try:
        sandbox.files.write("/home/user/w3/a.txt", "1")
        sandbox.files.write("/home/user/w3/sub/b.txt", "2")
        events = []
        deadline = time.time() + 10
        while time.time() < deadline and sum(e.name == "sub/b.txt" for e in events) < 3:
            events += handle.get_new_events()
            time.sleep(0.2)
    finally:
        handle.stop()
    expected = [FilesystemEventType.CREATE, FilesystemEventType.CHMOD, FilesystemEventType.WRITE]
    for name in ["a.txt", "sub/b.txt"]:
        assert [e.type for e in events if e.name == name] == expected, (name, events)


def test_a_write_replaces_the_files_metadata(sandbox):
    info = sandbox.files.write("/home/user/meta.txt", "1", metadata={"owner": "agent", "step": "1"})
    assert info.metadata == {"owner": "agent", "step": "1"}
    info = sandbox.files.write("/home/user/meta.txt", "2", metadata={"step": "2"})
    assert info.metadata == {"step": "2"}
    sandbox.files.write("/home/user/meta.txt", "3")
    assert not sandbox.files.get_info("/home/user/meta.txt").metadata
