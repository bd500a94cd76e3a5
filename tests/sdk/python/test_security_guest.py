"""Security of state handed to guests: userspace random state (Python's `random`, numpy's global
RNG) in the warm code-interpreter kernel must not be shared by sandboxes restored from one
memory image (the template snapshot, a user snapshot, a fork). The agent reseeds the kernel CRNG
at every /init and the interpreter then reseeds the kernel's userspace RNGs. Needs real
sandboxes of `code-interpreter-v1`."""

from e2b_code_interpreter import Sandbox

DRAW = "import random, numpy\n(random.random(), float(numpy.random.random()))"


def draw(sbx):
    ex = sbx.run_code(DRAW)
    assert ex.error is None, ex.error
    return ex.text


def test_two_sandboxes_from_the_template_draw_different_numbers():
    a = Sandbox.create(timeout=300, metadata={"suite": "security-guest"})
    try:
        b = Sandbox.create(timeout=300, metadata={"suite": "security-guest"})
        try:
            assert draw(a) != draw(b), "two sandboxes share Python's random state"
        finally:
            b.kill()
    finally:
        a.kill()


def test_snapshot_children_and_forks_draw_different_numbers():
    parent = Sandbox.create(timeout=300, metadata={"suite": "security-guest"})
    others = []
    snap = None
    try:
        parent.run_code("import random")
        snap = parent.create_snapshot()
        for _ in range(2):
            others.append(Sandbox.create(snap.snapshot_id, timeout=300))
        for r in parent.fork(count=2):
            assert not isinstance(r, Exception), r
            others.append(Sandbox.connect(r.sandbox_id))
        values = [draw(s) for s in [parent, *others]]
        assert len(set(values)) == len(values), f"clones share random state: {values}"
    finally:
        for s in others:
            s.kill()
        parent.kill()
        if snap is not None:
            Sandbox.delete_snapshot(snap.snapshot_id)
