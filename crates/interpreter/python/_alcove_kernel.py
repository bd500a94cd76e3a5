# Alcove code interpreter: helper module of Python kernels. The interpreter server writes it on
# the kernel's PYTHONPATH and an IPython startup file calls setup(). It
#  - holds the helpers the server calls (as `__import__('_alcove_kernel')`) to set environment
#    variables around a cell without touching the user's namespace;
#  - attaches structured chart data (application/vnd.alcove.chart+json) to matplotlib figures,
#    in the shape the e2b-code-interpreter SDKs parse as `Result.chart`;
#  - imports the heavy data libraries once, so a template snapshot holds them warm.
# Nothing here may raise: a broken startup file must not break the kernel.

import math as _math
import os as _os

CHART_MIME = "application/vnd.alcove.chart+json"

_saved = []


def env_apply(sandbox, per_call):
    """Sets the sandbox's variables for good and the call's own until env_restore()."""
    _os.environ.update(sandbox)
    if per_call:
        _saved.append({k: _os.environ.get(k) for k in per_call})
        _os.environ.update(per_call)


def reseed():
    """New userspace random state from the kernel CRNG (called after a snapshot restore or fork,
    once the agent has reseeded the CRNG): clones of one warm kernel must not share it."""
    import random
    import sys

    random.seed(_os.urandom(32))
    np = sys.modules.get("numpy")
    if np is not None:
        try:
            np.random.seed(np.frombuffer(_os.urandom(32), dtype=np.uint32))
        except Exception:
            pass


def env_restore():
    if not _saved:
        return
    for k, v in _saved.pop().items():
        if v is None:
            _os.environ.pop(k, None)
        else:
            _os.environ[k] = v


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return f if _math.isfinite(f) else None


def _axis_kind(axis):
    """'datetime', 'categorical' or the axis scale name."""
    try:
        import matplotlib.category as mcat
        import matplotlib.dates as mdates

        if isinstance(getattr(axis, "units", None), mcat.UnitData):
            return "categorical"
        fmt = axis.get_major_formatter()
        if isinstance(
            fmt,
            (mdates.DateFormatter, mdates.AutoDateFormatter, mdates.ConciseDateFormatter),
        ):
            return "datetime"
    except Exception:
        pass
    try:
        return axis.get_scale()
    except Exception:
        return "unknown"


def _converter(axis, kind):
    if kind == "datetime":
        import matplotlib.dates as mdates

        def conv(v):
            try:
                return mdates.num2date(float(v)).isoformat()
            except Exception:
                return _num(v)

        return conv
    if kind == "categorical":
        mapping = {v: k for k, v in axis.units._mapping.items()}

        def conv(v):
            try:
                return str(mapping.get(int(round(float(v))), v))
            except Exception:
                return _num(v)

        return conv
    return _num


def _axis_fields(ax):
    out = {}
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        kind = _axis_kind(axis)
        conv = _converter(axis, kind)
        out[name + "_label"] = axis.get_label().get_text() or None
        out[name + "_unit"] = None
        out[name + "_scale"] = kind
        out[name + "_ticks"] = [conv(t) for t in axis.get_ticklocs()]
        out[name + "_tick_labels"] = [t.get_text() for t in axis.get_ticklabels()]
        out["_conv_" + name] = conv
    return out


def _label(artist):
    label = artist.get_label() or ""
    return "" if label.startswith("_") else label


def _axes_chart(ax):
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    title = ax.get_title() or None
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if wedges:
        return {
            "type": "pie",
            "title": title,
            "elements": [
                {
                    "label": w.get_label(),
                    "angle": _num(abs(w.theta2 - w.theta1)),
                    "radius": _num(w.r),
                }
                for w in wedges
            ],
        }
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    axis = _axis_fields(ax)
    conv_x, conv_y = axis.pop("_conv_x"), axis.pop("_conv_y")
    if bars:
        elements = []
        for c in bars:
            horizontal = getattr(c, "orientation", "vertical") == "horizontal"
            group = _label(c)
            for rect in c.patches:
                if horizontal:
                    pos = rect.get_y() + rect.get_height() / 2
                    label, value = conv_y(pos), rect.get_width()
                else:
                    pos = rect.get_x() + rect.get_width() / 2
                    label, value = conv_x(pos), rect.get_height()
                elements.append({"label": str(label), "group": group, "value": _num(value)})
        return {
            "type": "bar",
            "title": title,
            "x_label": axis["x_label"],
            "y_label": axis["y_label"],
            "x_unit": None,
            "y_unit": None,
            "elements": elements,
        }
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 0]
    scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
    if lines:
        kind, elements = "line", [
            {
                "label": _label(ln),
                "points": [
                    [conv_x(x), conv_y(y)] for x, y in zip(ln.get_xdata(), ln.get_ydata())
                ],
            }
            for ln in lines
        ]
    elif scatters:
        kind, elements = "scatter", [
            {
                "label": _label(c),
                "points": [[conv_x(x), conv_y(y)] for x, y in c.get_offsets()],
            }
            for c in scatters
        ]
    else:
        return None
    chart = {"type": kind, "title": title, "elements": elements}
    chart.update(axis)
    return chart


def _figure_chart(fig):
    try:
        charts = [c for c in (_axes_chart(ax) for ax in fig.get_axes()) if c]
        if not charts:
            return None
        if len(charts) == 1:
            return charts[0]
        sup = getattr(fig, "_suptitle", None)
        return {
            "type": "superchart",
            "title": sup.get_text() if sup is not None else None,
            "elements": charts,
        }
    except Exception:
        return None


def _register_chart_formatter():
    try:
        from IPython import get_ipython
        from IPython.core.formatters import BaseFormatter
        from traitlets import ObjectName, Unicode
    except Exception:
        return
    ip = get_ipython()
    if ip is None:
        return

    class ChartFormatter(BaseFormatter):
        format_type = Unicode(CHART_MIME)
        print_method = ObjectName("_repr_alcove_chart_")
        _return_type = (dict,)

    formatter = ChartFormatter(parent=ip.display_formatter)
    ip.display_formatter.formatters[CHART_MIME] = formatter

    def ensure(*_args):
        # matplotlib-inline drops every formatter's Figure printer whenever it (re)configures
        # itself (pyplot's first import, `%matplotlib inline`), so put ours back before each
        # cell and before the end-of-cell figure flush.
        try:
            df = ip.display_formatter
            if df.formatters.get(CHART_MIME) is not formatter:
                df.formatters[CHART_MIME] = formatter
            if CHART_MIME not in df.active_types:
                df.active_types.append(CHART_MIME)
            key = ("matplotlib.figure", "Figure")
            if key not in formatter.deferred_printers and not any(
                getattr(t, "__module__", None) == key[0] and t.__name__ == key[1]
                for t in formatter.type_printers
            ):
                formatter.for_type_by_name(key[0], key[1], _figure_chart)
        except Exception:
            pass

    ensure()
    ip.events.register("pre_execute", ensure)
    ip.events.register("post_execute", ensure)


def _warm_imports():
    import importlib

    for name in ("numpy", "pandas", "matplotlib", "matplotlib.pyplot"):
        try:
            importlib.import_module(name)
        except Exception:
            pass
    try:
        from IPython import get_ipython

        ip = get_ipython()
        if ip is not None and "matplotlib.pyplot" in __import__("sys").modules:
            ip.run_line_magic("matplotlib", "inline")
    except Exception:
        pass


def setup():
    # Imports first: configuring matplotlib-inline resets figure formatters, ours included.
    try:
        _warm_imports()
    except Exception:
        pass
    try:
        _register_chart_formatter()
    except Exception:
        pass
