# Alcove code interpreter: helper module of Python kernels. The interpreter server writes it on
# the kernel's PYTHONPATH and an IPython startup file calls setup(). It
#  - holds the helpers the server calls (as `__import__('_alcove_kernel')`) to set environment
#    variables around a cell without touching the user's namespace;
#  - attaches structured chart data (application/vnd.alcove.chart+json) to matplotlib figures,
#    in the shape the e2b-code-interpreter SDKs parse as `Result.chart`, and the columns of
#    pandas DataFrames (application/vnd.alcove.data+json, `Result.data`);
#  - shows PIL images (Image.show(), and an image saved to a file) as PNG results;
#  - imports the heavy data libraries once, so a template snapshot holds them warm.
# Nothing here may raise: a broken startup file must not break the kernel.

import math as _math
import os as _os

import re as _re

CHART_MIME = "application/vnd.alcove.chart+json"
DATA_MIME = "application/vnd.alcove.data+json"
# The unit in an axis label: "Time (s)" -> "s", "Price [USD]" -> "USD".
_UNIT = _re.compile(r"[(\[]([^()\[\]]+)[)\]]\s*$")
# Chart numbers are rounded to this many decimals: a pie's 324 degrees are 324, not 323.99999.
_DECIMALS = 6
# DataFrames with more cells than this give no `data` (their text and HTML still come).
_DATA_CELLS = 1_000_000

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
    return round(f, _DECIMALS) if _math.isfinite(f) else None


def _unit(label):
    m = _UNIT.search(label or "")
    return m.group(1).strip() if m else None


def _jsonable(v):
    """A value JSON can carry: non-finite floats become null, dates ISO text, others str."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if _math.isfinite(v) else None
    iso = getattr(v, "isoformat", None)
    if callable(iso):
        try:
            return iso()
        except Exception:
            pass
    item = getattr(v, "item", None)  # numpy scalars
    if callable(item):
        try:
            return _jsonable(item())
        except Exception:
            pass
    return str(v)


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


def _labels_and_units(ax):
    out = {}
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        label = axis.get_label().get_text() or None
        out[name + "_label"] = label
        out[name + "_unit"] = _unit(label)
    return out


def _axis_fields(ax):
    out = _labels_and_units(ax)
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        kind = _axis_kind(axis)
        conv = _converter(axis, kind)
        out[name + "_scale"] = kind
        out[name + "_ticks"] = [conv(t) for t in axis.get_ticklocs()]
        out[name + "_tick_labels"] = [t.get_text() for t in axis.get_ticklabels()]
        out["_conv_" + name] = conv
    return out


def _label(artist):
    label = artist.get_label() or ""
    return "" if label.startswith("_") else label


def _box_chart(ax, title):
    """Box plots drawn by Axes.bxp (pyplot's and seaborn's boxplot), from the statistics it was
    given: recorded by the wrapper _patch_bxp installs."""
    elements = []
    ticks = {}
    try:
        vertical = True
        for stats, positions, vert in getattr(ax, "_alcove_boxes", []):
            vertical = vert
            axis = ax.xaxis if vert else ax.yaxis
            ticks = dict(zip(axis.get_ticklocs(), [t.get_text() for t in axis.get_ticklabels()]))
            for i, st in enumerate(stats):
                pos = positions[i] if positions is not None and i < len(positions) else i + 1
                label = st.get("label")
                if label is None:
                    label = ticks.get(pos, str(pos))
                elements.append(
                    {
                        "label": str(label),
                        "min": _num(st["whislo"]),
                        "first_quartile": _num(st["q1"]),
                        "median": _num(st["med"]),
                        "third_quartile": _num(st["q3"]),
                        "max": _num(st["whishi"]),
                        "outliers": [_num(f) for f in st.get("fliers", [])],
                    }
                )
    except Exception:
        return None
    chart = {"type": "box_and_whisker", "title": title, "elements": elements}
    chart.update(_labels_and_units(ax))
    if not vertical:
        # Horizontal boxes: the categories are on the y axis.
        chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
        chart["x_unit"], chart["y_unit"] = chart["y_unit"], chart["x_unit"]
    return chart


def _axes_chart(ax):
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer
    from matplotlib.patches import Wedge

    title = ax.get_title() or None
    if getattr(ax, "_alcove_boxes", None):
        return _box_chart(ax, title)
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    if wedges:
        return {
            "type": "pie",
            "title": title,
            "elements": [
                {
                    "label": w.get_label(),
                    "angle": _num(round(abs(w.theta2 - w.theta1), 4)),
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
            "x_unit": axis["x_unit"],
            "y_unit": axis["y_unit"],
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
    elif title or ax.patches or ax.collections or ax.images or ax.artists or ax.texts:
        # Something is drawn that is none of the kinds above: E2B calls it `unknown`.
        return {"type": "unknown", "title": title, "elements": []}
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


def _add_formatter(mime, method):
    """A display formatter giving `mime` (a dict) for the types registered on it, installed in
    the kernel's display formatter; None outside IPython."""
    from IPython import get_ipython
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    ip = get_ipython()
    if ip is None:
        return None, None

    class Formatter(BaseFormatter):
        format_type = Unicode(mime)
        print_method = ObjectName(method)
        _return_type = (dict,)

    formatter = Formatter(parent=ip.display_formatter)
    ip.display_formatter.formatters[mime] = formatter
    if mime not in ip.display_formatter.active_types:
        ip.display_formatter.active_types.append(mime)
    return ip, formatter


def _register_chart_formatter():
    ip, formatter = _add_formatter(CHART_MIME, "_repr_alcove_chart_")
    if ip is None:
        return

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


def _frame_data(df):
    """A DataFrame's columns as lists (E2B's `Result.data`); None for frames over _DATA_CELLS."""
    try:
        if df.size > _DATA_CELLS:
            return None
        return {
            str(k): [_jsonable(v) for v in col] for k, col in df.to_dict(orient="list").items()
        }
    except Exception:
        return None


def _register_data_formatter():
    ip, formatter = _add_formatter(DATA_MIME, "_repr_alcove_data_")
    if ip is None:
        return
    # pandas 3 names its classes' module `pandas`; earlier versions `pandas.core.frame`.
    for module in ("pandas", "pandas.core.frame"):
        formatter.for_type_by_name(module, "DataFrame", _frame_data)


def _patch_bxp():
    """Records the statistics of every box plot on its axes, for _box_chart."""
    import matplotlib.axes as maxes

    orig = maxes.Axes.bxp
    if getattr(orig, "_alcove", False):
        return

    def bxp(self, bxpstats, positions=None, *args, **kwargs):
        out = orig(self, bxpstats, positions, *args, **kwargs)
        try:
            vertical = (
                kwargs.get("orientation", "vertical") == "vertical"
                and kwargs.get("vert", True) is not False
            )
            boxes = self.__dict__.setdefault("_alcove_boxes", [])
            boxes.append(
                (
                    [dict(s) for s in bxpstats],
                    list(positions) if positions is not None else None,
                    vertical,
                )
            )
        except Exception:
            pass
        return out

    bxp._alcove = True
    bxp.__doc__ = orig.__doc__
    maxes.Axes.bxp = bxp


def _patch_pil():
    """Image.show() displays the image in the cell's results (there is no screen to open a viewer
    on), and so does saving one to a file, as E2B's interpreter does; matplotlib's own saves of
    figures through PIL are left alone."""
    import sys

    from PIL import Image

    if getattr(Image.Image.show, "_alcove", False):
        return
    orig_save = Image.Image.save

    def _display(img):
        from IPython.display import display

        display(img)

    def show(self, title=None, **options):
        _display(self)

    def save(self, fp, format=None, **params):
        out = orig_save(self, fp, format, **params)
        try:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if isinstance(fp, (str, _os.PathLike)) and not caller.startswith("matplotlib"):
                _display(self)
        except Exception:
            pass
        return out

    show._alcove = True
    show.__doc__ = Image.Image.show.__doc__
    save.__doc__ = orig_save.__doc__
    Image.Image.show = show
    Image.Image.save = save


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
    for step in (_register_chart_formatter, _register_data_formatter, _patch_bxp, _patch_pil):
        try:
            step()
        except Exception:
            pass
