"""Every metric the alerts, their tests and the dashboard query must be one failclosed-pep really exports.

Run with the project's venv (`make deploy-check` does):

  .venv/bin/python deploy/checks/metric_names.py --rules deploy/prometheus/pep-alerts.yaml \
      --rules-test deploy/prometheus/pep-alerts.test.yaml --dashboard deploy/grafana/failclosed-pep.json

The truth is the PEP's own registry (`pep.metrics.Metrics`, the one the admin listener serves on /metrics),
rendered in process with prometheus_client and parsed back as Prometheus text: sample names (with the
`_total`, `_bucket`, `_sum`, `_count` suffixes), their label names, and the label values that exist from start
(every reason, outcome, code class, ... is pre-created at 0). For each PromQL expression it checks:
- every metric name is a sample name of that render;
- every label in a selector `{...}` is a label of that metric or one Prometheus adds to every scraped target;
- a `=` or `=~` matcher on a closed label (reason, decision, outcome, ...) names, or matches, a value that
  exists, so `reason="pdp_timout"` or `outcome="success"` fails too;
- every label in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)` or `group_*(...)` exists on one of
  the expression's metrics (or is a target label, or `le`).
Expressions are tokenised, not regex-searched: strings, durations and Grafana's `$variables` are skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pep.breaker import State
from pep.metrics import Metrics

# Labels Prometheus attaches to every series of a PodMonitor target.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance", "service"}
# Labels whose values come from the config or the build, not from a closed set.
OPEN_VALUE_LABELS = {"route", "version"}
KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan", "atan2", "start", "end",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip

TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<var>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matchop>=~|!~|!=)
  | (?P<op>==|<=|>=|[-+*/%^<>=,(){}@])
    """,
    re.VERBOSE,
)


@dataclass
class Exported:
    """What the PEP's registry renders: sample name -> label name -> values seen."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    @classmethod
    def from_registry(cls) -> Exported:
        metrics = Metrics(("example",))
        # Per-route series that exist only for routes with a just-in-time credential: bound as a route would be.
        metrics.bind_credential_circuit("example", lambda: State.CLOSED)
        metrics.credential_transitions("example")
        text = generate_latest(metrics.registry).decode()
        labels: dict[str, dict[str, set[str]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                entry = labels.setdefault(sample.name, defaultdict(set))
                for k, v in sample.labels.items():
                    entry[k].add(v)
        return cls(labels)


@dataclass
class Tok:
    kind: str
    text: str


def tokenize(expr: str) -> list[Tok]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos : pos + 20]!r} at offset {pos}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind not in ("ws", "comment"):
            out.append(Tok(kind, m.group()))
    return out


def unquote(s: str) -> str:
    if s[0] == "`":
        return s[1:-1]
    return str(json.loads('"' + s[1:-1].replace('\\"', '"').replace('"', '\\"') + '"'))


@dataclass
class Selector:
    metric: str | None
    matchers: list[tuple[str, str, str | None]]  # label, op, value (None: holds a Grafana variable)


def parse(expr: str) -> tuple[list[Selector], set[str]]:
    """Selectors (metric plus matchers) and the labels named in grouping/matching clauses."""
    toks = tokenize(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0

    def matchers(j: int) -> tuple[list[tuple[str, str, str | None]], int]:
        """Parse `{a="x", b=~"y"}` from toks[j] == '{'; return the matchers and the index after '}'."""
        found: list[tuple[str, str, str | None]] = []
        j += 1
        while toks[j].text != "}":
            if toks[j].text == ",":
                j += 1
                continue
            label, op, value = toks[j], toks[j + 1], toks[j + 2]
            if label.kind != "ident" or op.text not in ("=", "!=", "=~", "!~") or value.kind != "string":
                raise ValueError(f"unexpected matcher {label.text} {op.text} {value.text}")
            raw = unquote(value.text)
            found.append((label.text, op.text, None if "$" in raw else raw))
            j += 3
        return found, j + 1

    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if t.kind == "ident" and t.text in GROUPING and nxt is not None and nxt.text == "(":
            j = i + 2
            while toks[j].text != ")":
                if toks[j].kind == "ident":
                    grouping.add(toks[j].text)
                j += 1
            i = j + 1
        elif t.kind == "ident" and nxt is not None and nxt.text == "(":
            i += 1  # a function or an aggregation
        elif t.kind == "ident" and t.text in AGGREGATIONS and nxt is not None and nxt.text in ("by", "without"):
            i += 1  # `sum by (...) (...)`: the clause is read next
        elif t.kind == "ident" and t.text.lower() not in KEYWORDS:
            if nxt is not None and nxt.text == "{":
                found, i = matchers(i + 1)
                selectors.append(Selector(t.text, found))
            else:
                selectors.append(Selector(t.text, []))
                i += 1
        elif t.text == "{":
            found, i = matchers(i)
            selectors.append(Selector(None, found))
        else:
            i += 1
    return selectors, grouping


def check(expr: str, where: str, exported: Exported) -> list[str]:
    try:
        selectors, grouping = parse(expr)
    except (ValueError, IndexError) as exc:
        return [f"{where}: cannot parse the expression: {exc}\n    {expr}"]
    problems = []
    if not selectors:
        problems.append(f"{where}: no metric in the expression: {expr}")
    seen_labels = set(TARGET_LABELS)
    for sel in selectors:
        if sel.metric is None:
            problems.append(f"{where}: a selector without a metric name cannot be checked: {expr}")
            continue
        labels = exported.labels.get(sel.metric)
        if labels is None:
            problems.append(f"{where}: metric {sel.metric} is not exported by failclosed-pep")
            continue
        seen_labels |= set(labels) | {"le"}
        for label, op, value in sel.matchers:
            if label not in labels and label not in TARGET_LABELS:
                problems.append(f"{where}: {sel.metric} has no label {label!r} (it has {sorted(labels)})")
                continue
            if value is None or label in TARGET_LABELS or label in OPEN_VALUE_LABELS or op not in ("=", "=~"):
                continue
            values = labels[label]
            hit = value in values if op == "=" else any(re.fullmatch(value, v) for v in values)
            if not hit:
                problems.append(f"{where}: {sel.metric}{{{label}{op}{value!r}}} matches none of {sorted(values)}")
    for label in sorted(grouping - seen_labels):
        problems.append(f"{where}: grouping label {label!r} is on none of the expression's metrics")
    return problems


def rule_exprs(path: Path) -> list[tuple[str, str]]:
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    out = []
    for doc in docs:
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                out.append((f"{path}: {name}", rule["expr"]))
    return out


def test_series(path: Path) -> list[tuple[str, str]]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        (f"{path}: tests[{i}] input series", series["series"])
        for i, test in enumerate(doc["tests"])
        for series in test.get("input_series", [])
    ]


LABEL_VALUES = re.compile(r"^\s*label_values\((?:(?P<query>.*),\s*)?(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def dashboard_exprs(path: Path) -> list[tuple[str, str]]:
    dash = json.loads(path.read_text(encoding="utf-8"))
    out = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            panels(panel.get("panels", []))
            for target in panel.get("targets", []):
                if "expr" in target:
                    out.append((f"{path}: panel {panel.get('title')!r} {target.get('refId')}", target["expr"]))

    panels(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = LABEL_VALUES.match(query)
        where = f"{path}: variable ${var['name']}"
        if m is None or m.group("query") is None:
            out.append((where, query))  # checked as PromQL, and fails if it is not
        else:
            # label_values(SELECTOR, LABEL): LABEL must be on the selector's metric.
            sel = m.group("query").strip()
            out.append((where, f"count by ({m.group('label')}) ({sel})"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", type=Path, action="append", default=[])
    parser.add_argument("--rules-test", type=Path, action="append", default=[])
    parser.add_argument("--dashboard", type=Path, action="append", default=[])
    args = parser.parse_args(argv)
    exported = Exported.from_registry()
    exprs = [e for p in args.rules for e in rule_exprs(p)]
    exprs += [e for p in args.rules_test for e in test_series(p)]
    exprs += [e for p in args.dashboard for e in dashboard_exprs(p)]
    problems = [p for where, expr in exprs for p in check(expr, where, exported)]
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return 1
    used = sorted({s.metric for _, e in exprs for s in parse(e)[0] if s.metric})
    print(f"{len(exprs)} expressions use only exported metrics and labels: {', '.join(used)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
