"""The official e2b-code-interpreter SDK (unmodified) against the `code-interpreter-v1` template:
stateful kernels, rich results and charts, errors, streaming, contexts, restart, timeouts and
the Bash and R kernels. Needs real sandboxes."""

import base64
import time

import pytest
from e2b import TimeoutException
from e2b_code_interpreter import Sandbox


@pytest.fixture(scope="module")
def ci():
    sbx = Sandbox.create(timeout=600, envs={"FROM_CREATE": "created"}, metadata={"suite": "ci"})
    try:
        yield sbx
    finally:
        sbx.kill()


def test_state_persists_and_first_cell_is_warm(ci):
    ci.run_code("x = 1")
    assert ci.run_code("x + 1").text == "2"
    # The template snapshot holds a kernel with pandas and matplotlib already imported.
    assert ci.run_code("import sys; 'pandas' in sys.modules and 'matplotlib' in sys.modules").text == "True"


def test_matplotlib_png_and_chart(ci):
    code = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot([1, 2, 3], [4, 5, 1], label="sales")
ax.set_title("Sales")
ax.set_xlabel("day")
plt.show()
"""
    ex = ci.run_code(code)
    assert ex.error is None, ex.error
    figs = [r for r in ex.results if r.png]
    assert len(figs) == 1
    png = base64.b64decode(figs[0].png)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chart = figs[0].chart
    assert chart is not None and chart.type == "line"
    assert chart.title == "Sales"
    assert chart.x_label == "day"
    assert chart.elements[0].label == "sales"
    assert [tuple(p) for p in chart.elements[0].points] == [(1.0, 4.0), (2.0, 5.0), (3.0, 1.0)]


def test_bar_and_pie_charts(ci):
    ex = ci.run_code("""
import matplotlib.pyplot as plt
plt.bar(["a", "b"], [3, 4]); plt.show()
plt.pie([1, 3], labels=["x", "y"]); plt.show()
""")
    charts = [r.chart for r in ex.results if r.chart]
    assert [c.type for c in charts] == ["bar", "pie"]
    assert [(e.label, e.value) for e in charts[0].elements] == [("a", 3.0), ("b", 4.0)]
    assert [e.label for e in charts[1].elements] == ["x", "y"]
    assert charts[1].elements[1].angle == pytest.approx(270.0)


def test_dataframe_has_html_and_text(ci):
    ex = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    main = [r for r in ex.results if r.is_main_result][0]
    assert "<table" in main.html
    assert "a" in main.text and "x" in main.text


def test_exception_has_name_value_traceback(ci):
    ex = ci.run_code("def f():\n    return 1 / 0\nf()")
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert "division by zero" in ex.error.value
    assert "f()" in ex.error.traceback
    # The context is still usable.
    assert ci.run_code("40 + 2").text == "42"


def test_stdout_streams_in_order(ci):
    seen = []
    ex = ci.run_code(
        "import time, sys\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.2)\nprint('err', file=sys.stderr)",
        on_stdout=lambda m: seen.append(m.line),
    )
    assert "".join(seen).split() == ["0", "1", "2", "3", "4"]
    assert "".join(ex.logs.stdout).split() == ["0", "1", "2", "3", "4"]
    assert "err" in "".join(ex.logs.stderr)


def test_contexts_are_isolated_and_restart_clears_state(ci):
    a = ci.create_code_context()
    b = ci.create_code_context(cwd="/tmp")
    ci.run_code("secret = 'a'", context=a)
    ex = ci.run_code("secret", context=b)
    assert ex.error is not None and ex.error.name == "NameError"
    assert ci.run_code("import os; os.getcwd()", context=b).text == "/tmp"
    ids = {c.id for c in ci.list_code_contexts()}
    assert {a.id, b.id} <= ids
    ci.restart_code_context(a)
    ex = ci.run_code("secret", context=a)
    assert ex.error is not None and ex.error.name == "NameError"
    ci.remove_code_context(b)
    assert b.id not in {c.id for c in ci.list_code_contexts()}


def test_timeout_interrupts_and_context_stays_usable(ci):
    ctx = ci.create_code_context()
    ci.run_code("y = 5", context=ctx)
    with pytest.raises(TimeoutException):
        ci.run_code("while True:\n    pass", context=ctx, timeout=3)
    # The interrupted kernel keeps its state and answers again.
    deadline = time.time() + 60
    while True:
        ex = ci.run_code("y * 2", context=ctx)
        if ex.text == "10" or time.time() > deadline:
            break
    assert ex.text == "10"


def test_env_vars_per_call_and_from_create(ci):
    ex = ci.run_code("import os; os.environ.get('PER_CALL')", envs={"PER_CALL": "yes"})
    assert ex.text == "yes"
    assert ci.run_code("import os; os.environ.get('PER_CALL')").text in (None, "None")
    assert ci.run_code("import os; os.environ.get('FROM_CREATE')").text == "created"


def test_bash_kernel(ci):
    ex = ci.run_code("echo hello from $0; echo $FROM_CREATE", language="bash")
    assert ex.error is None
    assert "hello from" in "".join(ex.logs.stdout)
    assert "created" in "".join(ex.logs.stdout)


def test_r_kernel(ci):
    ex = ci.run_code("x <- c(1, 2, 3)\nprint(sum(x))", language="r", timeout=240)
    assert ex.error is None, ex.error
    assert "6" in "".join(ex.logs.stdout) + "".join(r.text or "" for r in ex.results)


def test_unknown_language_is_a_clear_error(ci):
    from e2b import SandboxException

    with pytest.raises(SandboxException) as e:
        ci.run_code("1", language="cobol")
    assert "available languages" in str(e.value)
