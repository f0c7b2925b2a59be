"""Sample lines in Prometheus text and OpenMetrics, byte for byte what prometheus_client writes.

prometheus_client builds a ``Sample`` object with a label dict per sample, sorts the labels
and formats each line; at 10,000 series that costs more than everything else in a scrape.
Here each family gets, once, a format string with its label names already sorted, so a line
is one ``str.format`` of the escaped label values and the value. Sample lines are the same in
both formats; only the family headers differ, and those are written by prometheus_client's
own encoders (from an empty family), so they cannot drift from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.exposition import generate_latest as text_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.utils import floatToGoString

from kafka_backup.schemas import catalogue as cat

EOF = "# EOF\n"
_EXACT_INT = 2**53  # beyond it float(n) rounds
_GO_EXPONENT = 1_000_000.0  # floatToGoString writes positive numbers from here on with an exponent


def value(v: Any) -> str:
    """``floatToGoString``, with its common cases first: small ints and ordinary floats."""
    t = type(v)
    if t is int:
        if -_EXACT_INT < v < _GO_EXPONENT:
            return f"{v}.0"
    elif t is float:
        if -math.inf < v < _GO_EXPONENT:  # false for NaN and the infinities
            return repr(v)
        if _GO_EXPONENT <= v < math.inf:  # Go's exponent form, as floatToGoString writes it
            s = repr(v)
            dot = s.find(".")
            if dot > 6:
                return f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.") + f"e+{dot - 1:02d}"
            return s
    return floatToGoString(v)


def escape(v: str) -> str:
    """A label value, escaped as both encoders do (a non-string fails, as it does there)."""
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return v


def _template(name: str, labels: Sequence[str], value_index: int) -> str:
    """``name{a="{i}",...} {value_index}`` with the labels sorted by name, each pointing at its
    position in ``labels``: ``template.format(*values, value)`` writes a line."""
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    inner = ",".join(f'{labels[i]}="{{{i}}}"' for i in order)
    head = f"{name}{{{{{inner}}}}}" if labels else name
    return f"{head} {{{value_index}}}\n"


def _generic(name: str, labels: Sequence[str], values: Iterable[Any], v: Any) -> str:
    """Exactly prometheus_client's path (``dict(zip(...))``, then sorted): for label tuples whose
    length does not match the family's."""
    items = sorted(dict(zip(labels, values, strict=False)).items())
    inner = ",".join(f'{k}="{escape(x)}"' for k, x in items)
    return f"{name}{{{inner}}} {value(v)}\n" if inner else f"{name} {value(v)}\n"


class _One:
    def __init__(self, family: Any) -> None:
        self._family = family

    def collect(self) -> list:
        return [self._family]


class FamilyFormat:
    """How one catalogue family is written: its two headers and ``lines(sample)``."""

    def __init__(self, m: cat.Metric, empty_family: Any) -> None:
        self.text_header = text_latest(_One(empty_family)).decode()
        self.om_header = om_latest(_One(empty_family)).decode().removesuffix(EOF)
        name, labels = empty_family.name, tuple(m.labels)
        self.lines: Callable[[tuple], str]
        if m.type == "histogram":
            self.lines = self._histogram(name, labels)
        elif m.type == "stateset":
            self.lines = self._stateset(name, labels)
        elif m.type == "info":
            self.lines = self._info(name + "_info", labels)
        else:
            self.lines = self._plain(name + "_total" if m.type == "counter" else name, labels)

    @staticmethod
    def _plain(name: str, labels: tuple[str, ...]) -> Callable[[tuple], str]:
        compiled = _compiled(name, labels)
        if compiled is not None:
            return compiled
        n, fmt = len(labels), _template(name, labels, len(labels)).format

        def lines(sample: tuple) -> str:
            values, v = sample
            if len(values) != n:
                return _generic(name, labels, values, v)
            return fmt(*[escape(x) for x in values], value(v))

        return lines

    @staticmethod
    def _info(name: str, labels: tuple[str, ...]) -> Callable[[tuple], str]:
        compiled = _compiled(name, labels, "1.0")
        if compiled is not None:
            return compiled
        fmt = _template(name, labels, len(labels)).format
        return lambda sample: fmt(*[escape(x) for x in sample[0]], "1.0")  # collect() checked the length

    @staticmethod
    def _histogram(name: str, labels: tuple[str, ...]) -> Callable[[tuple], str]:
        n = len(labels)
        bucket = _template(name + "_bucket", (*labels, "le"), n + 1).format
        count = _template(name + "_count", labels, n).format
        total = _template(name + "_sum", labels, n).format

        def lines(sample: tuple) -> str:
            values, buckets, sum_value = sample
            if len(values) != n:
                return _histogram_generic(name, labels, values, buckets, sum_value)
            escaped = [escape(x) for x in values]
            out = [bucket(*escaped, escape(le), value(v)) for le, v in buckets]
            if float(buckets[0][0]) >= 0 and sum_value is not None:
                out.append(count(*escaped, value(buckets[-1][1])))
                out.append(total(*escaped, value(sum_value)))
            return "".join(out)

        return lines

    @staticmethod
    def _stateset(name: str, labels: tuple[str, ...]) -> Callable[[tuple], str]:
        n = len(labels)
        fmt = _template(name, (*labels, name), n + 1).format

        def lines(sample: tuple) -> str:
            values, states = sample
            if len(values) != n:
                return "".join(_generic(name, (*labels, name), (*values, state), 1 if on else 0)
                               for state, on in sorted(states.items()))
            escaped = [escape(x) for x in values]
            return "".join(fmt(*escaped, escape(state), "1.0" if on else "0.0") for state, on in sorted(states.items()))

        return lines


_LEGACY_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _compiled(name: str, labels: tuple[str, ...], constant: str | None = None) -> Callable[[tuple], str] | None:
    """The line of a gauge, counter or info sample as one f-string, compiled once per family (a
    third of ``str.format``'s cost); None for names that would need quoting in the source."""
    if not all(_LEGACY_NAME.fullmatch(x) for x in (name, *labels)):
        return None
    n = len(labels)
    args = [f"a{i}" for i in range(n)]
    order = sorted(range(n), key=lambda i: labels[i])
    inner = ",".join(f'{labels[i]}="{{a{i}}}"' for i in order)
    head = f"{name}{{{{{inner}}}}}" if n else name
    tail = constant if constant is not None else "{value(v)}"
    checks = "".join(f"    if '\\\\' in {a} or '\\n' in {a} or '\"' in {a}:\n        {a} = escape({a})\n"
                     for a in args)
    unpack = f"    {', '.join(args)}, = values\n" if n else ""
    source = (f"def lines(sample):\n"
              f"    values = sample[0]\n"
              f"    if len(values) != {n}:\n"
              f"        return generic(name, labels, values, sample[1])\n"
              f"{unpack}{checks}"
              + ("" if constant is not None else "    v = sample[1]\n")
              + f"    return f'{head} {tail}\\n'\n")
    scope: dict[str, Any] = {"escape": escape, "value": value, "generic": _generic, "name": name, "labels": labels}
    exec(source, scope)  # noqa: S102 - built above from names checked against _LEGACY_NAME
    lines: Callable[[tuple], str] = scope["lines"]
    return lines


def _histogram_generic(name: str, labels: tuple[str, ...], values: Sequence[str], buckets: Sequence[tuple],
                       sum_value: Any) -> str:
    """prometheus_client's histogram samples, for label tuples whose length does not match."""
    pairs = list(zip(labels, values, strict=False))
    out = [_generic(name + "_bucket", [k for k, _ in pairs] + ["le"], [x for _, x in pairs] + [b[0]], b[1])
           for b in buckets]
    if float(buckets[0][0]) >= 0 and sum_value is not None:
        out.append(_generic(name + "_count", labels, values, buckets[-1][1]))
        out.append(_generic(name + "_sum", labels, values, sum_value))
    return "".join(out)
