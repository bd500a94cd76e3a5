"""The official e2b-code-interpreter SDK (unmodified) against the `code-interpreter-v1` template:
stateful kernels, rich results and charts, errors, streaming, contexts, restart, timeouts, the
Bash and R kernels, and JavaScript/TypeScript through Deno's kernel. Needs real sandboxes."""

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
    assert "javascript, typescript" in str(e.value)
    # Java has no kernel installable from the registries template builds reach: say so.
    with pytest.raises(SandboxException) as e:
        ci.run_code("1 + 1", language="java")
    assert "IJava" in str(e.value) and "kernelspec named `java`" in str(e.value)


def test_javascript_and_typescript(ci):
    # ES modules and top-level await, state across cells, in the default JS context.
    ex = ci.run_code(
        "import { join } from 'node:path';\n"
        "const parts = await Promise.resolve(['a', 'b']);\n"
        "console.log('joined', join(...parts));\n"
        "globalThis.counter = 41;",
        language="js",
        timeout=240,
    )
    assert ex.error is None, ex.error
    assert "joined a/b" in "".join(ex.logs.stdout)
    assert ci.run_code("counter + 1", language="javascript").text == "42"
    # Strings come back without their quotes, as E2B gives them.
    assert ci.run_code("process.cwd()", language="js").text == "/home/user"
    # TypeScript: annotations are accepted; its own context is separate from JavaScript's.
    ex = ci.run_code(
        "interface P { x: number }\nconst p: P = { x: 20 };\np.x * 2", language="ts", timeout=240
    )
    assert ex.error is None, ex.error
    assert ex.text == "40"
    ex = ci.run_code("typeof counter", language="ts")
    assert ex.text == "undefined"
    # A context of its own, in another directory, keeps its own state.
    ctx = ci.create_code_context(language="ts", cwd="/tmp")
    assert ctx.language == "typescript"
    ci.run_code("let n: number = 5", context=ctx)
    assert ci.run_code("n * 3", context=ctx).text == "15"
    assert ci.run_code("Deno.cwd()", context=ctx).text == "/tmp"
    # Errors carry the JavaScript error's name and message.
    ex = ci.run_code("throw new RangeError('too far')", language="js")
    assert ex.error is not None and ex.error.name == "RangeError"
    assert ex.error.value == "too far"


def test_javascript_env_vars(ci):
    assert ci.run_code("process.env.FROM_CREATE", language="js").text == "created"
    ex = ci.run_code("process.env.FOO", envs={"FOO": "bar"}, language="js")
    assert ex.text == "bar"
    assert ci.run_code("process.env.FOO || 'default'", language="js").text == "default"
    ex = ci.run_code("process.env.FROM_CREATE", envs={"FROM_CREATE": "over"}, language="js")
    assert ex.text == "over"
    assert ci.run_code("process.env.FROM_CREATE", language="js").text == "created"


def test_r_env_vars(ci):
    ex = ci.run_code("Sys.getenv('FROM_CREATE')", language="r", timeout=240)
    assert ex.results[0].text.strip() == '[1] "created"'
    ex = ci.run_code("Sys.getenv('FOO')", envs={"FOO": "bar"}, language="r")
    assert ex.results[0].text.strip() == '[1] "bar"'
    ex = ci.run_code("Sys.getenv('FOO', unset = 'default')", language="r")
    assert ex.results[0].text.strip() == '[1] "default"'
    ex = ci.run_code("Sys.getenv('FROM_CREATE')", envs={"FROM_CREATE": 'say "hi"'}, language="r")
    assert ex.results[0].text.strip() == '[1] "say \\"hi\\""'
    ex = ci.run_code("Sys.getenv('FROM_CREATE')", language="r")
    assert ex.results[0].text.strip() == '[1] "created"'


def test_kernels_run_as_root(ci):
    # As E2B's: a context may start in /root, and cells run as root.
    ctx = ci.create_code_context(cwd="/root")
    ex = ci.run_code("import os; (os.getuid(), os.getcwd())", context=ctx)
    assert ex.error is None, ex.error
    assert ex.text == "(0, '/root')"
    assert ci.run_code("import os; os.getcwd()").text == "/home/user"


def test_dataframe_data(ci):
    ex = ci.run_code(
        "import pandas as pd, numpy as np\n"
        "pd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', None], 'c': [0.5, np.nan, 2.0],\n"
        "              't': pd.to_datetime(['2024-01-01', '2024-01-02', '2024-01-03'])})"
    )
    main = [r for r in ex.results if r.is_main_result][0]
    assert main.data == {
        "a": [1, 2, 3],
        "b": ["x", "y", None],
        "c": [0.5, None, 2.0],
        "t": ["2024-01-01T00:00:00", "2024-01-02T00:00:00", "2024-01-03T00:00:00"],
    }
    assert "<table" in main.html


def test_pil_images_show_and_save(ci):
    make = (
        "import numpy\nfrom PIL import Image\n"
        "image = Image.fromarray((numpy.random.rand(16, 16, 3) * 255).astype('uint8')).convert('RGBA')\n"
    )
    for tail in ("image.show()\nprint('shown')", "image.save('/tmp/saved.png')\nprint('saved')", "image"):
        ex = ci.run_code(make + tail)
        assert ex.error is None, ex.error
        pngs = [r.png for r in ex.results if r.png]
        assert len(pngs) == 1, tail
        assert base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    # matplotlib saving a figure (through PIL) adds no image of its own.
    ex = ci.run_code(
        "import matplotlib.pyplot as plt\nfig = plt.figure(); fig.savefig('/tmp/fig.png'); plt.close(fig)"
    )
    assert ex.error is None, ex.error
    assert [r for r in ex.results if r.png] == []


def test_charts_as_e2b_reports_them(ci):
    ex = ci.run_code("""
import datetime, numpy as np, matplotlib.pyplot as plt
dates = [datetime.date(2023, 9, 1) + datetime.timedelta(seconds=i) for i in range(10)]
plt.figure(); plt.plot(dates, np.sin(np.arange(10)), label='sin')
plt.xlabel('Time (s)'); plt.ylabel('Amplitude (Hz)'); plt.title('waves'); plt.show()

x = np.linspace(0, 100, 20)
plt.figure(); plt.plot(x, np.exp(x)); plt.yscale('log'); plt.ylabel('Y-axis (log scale)'); plt.show()

fig, ax = plt.subplots(); ax.pie([90, 10], labels=['No', 'Yes'], startangle=90); ax.set_title('pie'); plt.show()

fig, ax = plt.subplots(); ax.set_title('Exam'); ax.set_xlabel('Class'); ax.set_ylabel('Score')
ax.boxplot([[85, 90, 78, 92, 88], [95, 89, 76, 91, 84, 87]], tick_labels=['A', 'B']); plt.show()

fig, ax = plt.subplots(); ax.add_artist(plt.Circle((0, 0), 1, fill=False)); plt.title('Circles'); plt.show()
""")
    assert ex.error is None, ex.error
    line, log, pie, box, unknown = [r.chart for r in ex.results if r.png]
    assert (line.type, line.x_unit, line.y_unit, line.x_scale) == ("line", "s", "Hz", "datetime")
    assert (log.type, log.y_scale, log.y_unit, log.x_unit) == ("line", "log", "log scale", None)
    assert [(e.label, e.angle) for e in pie.elements] == [("No", 324), ("Yes", 36)]
    assert box.type == "box_and_whisker" and box.title == "Exam"
    assert (box.x_label, box.y_label) == ("Class", "Score")
    assert [(b.label, b.min, b.first_quartile, b.median, b.third_quartile, b.max, b.outliers)
            for b in box.elements] == [("A", 78, 85, 88, 90, 92, []), ("B", 84, 84.75, 88, 90.5, 95, [76])]
    assert (unknown.type, unknown.title, unknown.elements) == ("unknown", "Circles", [])


def test_input_is_a_clear_error(ci):
    ex = ci.run_code("name = input('your name? ')")
    assert ex.error is not None
    assert ex.error.name == "StdinNotImplementedError"
    assert "input() is not supported" in ex.error.value
    assert ci.run_code("1 + 1").text == "2"
