#!/usr/bin/env python3
"""Checks deploy/grafana/trellis-dashboard.json (Python 3 standard library only).

    python3 deploy/grafana/check.py [path/to/dashboard.json]

Checks:
  1. the file is valid JSON and a Grafana dashboard of schemaVersion 39;
  2. every panel (rows and panels nested in collapsed rows included) has an id, and ids are unique;
  3. every panel except rows uses the datasource ${datasource}, and so does each of its targets;
  4. every metric name (a `trellis_[a-z_]+` token) in a target expr or a variable query is one the
     proxy or the control plane exports; histograms only as `<name>_bucket`;
  5. every template variable referenced anywhere ($name, ${name}, ${name:fmt}, [[name]]) is
     defined, and a variable's query refers only to variables defined before it; `datasource`
     is a datasource variable for Prometheus;
  6. each non-row panel has a title, a description, at least one target with an expr, unique
     refIds, and a gridPos inside the 24 columns that overlaps no other panel.
If `promtool` (Prometheus) is on PATH, every expr is also parsed by it, with the variables
replaced by sample values; without it that step is skipped and says so.

Exits 0 when everything holds, 1 listing every failure, 2 when the file cannot be read or parsed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "trellis-dashboard.json")

# Counters carry `_total` in the exposition; gauges are listed as they are.
PROXY_METRICS = {
    "trellis_requests_total",
    "trellis_request_bytes_total",
    "trellis_response_bytes_total",
    "trellis_proxy_errors_total",
    "trellis_retries_total",
    "trellis_retry_budget_exhausted_total",
    "trellis_endpoint_ejections_total",
    "trellis_tcp_connections_opened_total",
    "trellis_tcp_connections_closed_total",
    "trellis_tcp_connections_open",
    "trellis_tcp_read_bytes_total",
    "trellis_tcp_write_bytes_total",
    "trellis_upstream_connections_opened_total",
    "trellis_tls_handshakes_total",
    "trellis_identity_certificates_total",
    "trellis_identity_expiry_timestamp_seconds",
    "trellis_policy_loads_total",
    "trellis_policy_version",
    "trellis_trace_spans_exported_total",
    "trellis_trace_spans_dropped_total",
    "trellis_access_log_dropped_lines_total",
    "trellis_process_resident_memory_bytes",
    "trellis_process_open_fds",
    "trellis_process_cpu_seconds_total",
}
CONTROL_METRICS = {
    "trellis_control_proxies_connected",
    "trellis_control_snapshot_pushes_total",
    "trellis_control_snapshot_answers_total",
    "trellis_control_apply_errors_total",
    "trellis_control_certificates_total",
    "trellis_control_unauthorized_calls_total",
}
HISTOGRAMS = {
    "trellis_request_duration_seconds",
    "trellis_control_convergence_seconds",
}
HISTOGRAM_SUFFIXES = ("_bucket",)

ALLOWED_METRICS = (
    PROXY_METRICS
    | CONTROL_METRICS
    | {h + s for h in HISTOGRAMS for s in HISTOGRAM_SUFFIXES}
)

METRIC_RE = re.compile(r"(?<![A-Za-z0-9_:])trellis_[a-z_]+")

# Grafana's own variables; any other `$__name` is reported as undefined (a typo, most likely).
BUILTIN_VARIABLES = {
    "__all", "__auto", "__dashboard", "__data", "__field", "__from", "__interval",
    "__interval_ms", "__name", "__org", "__range", "__range_ms", "__range_s",
    "__rate_interval", "__rate_interval_ms", "__series", "__timeFilter", "__to",
    "__user", "__value", "timeFilter",
}
# $name, ${name}, ${name:format}, ${name.field}, [[name]], [[name:format]]
VARIABLE_RE = re.compile(
    r"\$([A-Za-z_][A-Za-z0-9_]*)"
    r"|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:\.[^:}]+)?(?::[^}]+)?\}"
    r"|\[\[([A-Za-z_][A-Za-z0-9_]*)(?::[^\]]+)?\]\]"
)

DATASOURCE_REF = "${datasource}"
GRID_COLUMNS = 24


def variables_in(text):
    for m in VARIABLE_RE.finditer(text):
        yield next(g for g in m.groups() if g is not None)


def strings_in(node, where):
    """Yields (where, string) for every string value below node."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings_in(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from strings_in(v, f"{where}[{i}]")


def all_panels(panels):
    """Top-level panels and those nested in (collapsed) rows."""
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])


def label(panel):
    return f"panel {panel.get('id', '?')} ({panel.get('title') or panel.get('type', '?')!r})"


def datasource_uid(ds):
    if isinstance(ds, str):
        return ds
    if isinstance(ds, dict):
        return ds.get("uid")
    return None


def check_datasource(owner, ds, errors):
    if ds is None:
        errors.append(f"{owner}: no datasource (want {DATASOURCE_REF})")
        return
    uid = datasource_uid(ds)
    if uid != DATASOURCE_REF:
        errors.append(f"{owner}: datasource {json.dumps(ds)} (want uid {DATASOURCE_REF})")
    if isinstance(ds, dict) and ds.get("type") not in (None, "prometheus"):
        errors.append(f"{owner}: datasource type {ds.get('type')!r} (want 'prometheus')")


def check_metrics(owner, expr, errors):
    for name in sorted(set(METRIC_RE.findall(expr))):
        if name in ALLOWED_METRICS:
            continue
        if name in HISTOGRAMS:
            hint = f" (a histogram: use {name}_bucket)"
        else:
            hint = ""
        errors.append(f"{owner}: unknown metric {name}{hint}")


def label_values_selector(query):
    """The series selector of `label_values(selector, label)`, or None."""
    m = re.match(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", query, re.S)
    return m.group(1) if m else None


def variable_query(var):
    q = var.get("query")
    if isinstance(q, dict):
        q = q.get("query")
    return q if isinstance(q, str) else ""


def check(dashboard):
    errors = []
    notes = []

    if dashboard.get("schemaVersion") != 39:
        errors.append(f"schemaVersion is {dashboard.get('schemaVersion')!r} (want 39)")

    # ---- templating
    variables = (dashboard.get("templating") or {}).get("list") or []
    defined = []
    for i, var in enumerate(variables):
        name = var.get("name")
        if not name:
            errors.append(f"templating.list[{i}]: variable without a name")
            continue
        if name in defined:
            errors.append(f"variable ${name} is defined twice")
        query = variable_query(var)
        for ref in variables_in(query) if var.get("type") != "datasource" else ():
            if ref not in defined and ref not in BUILTIN_VARIABLES:
                errors.append(
                    f"variable ${name}: its query refers to ${ref}, which is not defined before it"
                )
        if var.get("type") == "query":
            check_datasource(f"variable ${name}", var.get("datasource"), errors)
            check_metrics(f"variable ${name} query", query, errors)
        defined.append(name)
    ds_var = next((v for v in variables if v.get("name") == "datasource"), None)
    if ds_var is None:
        errors.append("no template variable 'datasource'")
    elif ds_var.get("type") != "datasource" or ds_var.get("query") != "prometheus":
        errors.append(
            "variable $datasource must have type 'datasource' and query 'prometheus' "
            f"(has type {ds_var.get('type')!r}, query {ds_var.get('query')!r})"
        )

    # Every reference anywhere in the dashboard (panels, titles, links, variables).
    used = set()
    for where, text in strings_in(dashboard, "dashboard"):
        for ref in variables_in(text):
            used.add(ref)
            if ref not in defined and ref not in BUILTIN_VARIABLES:
                errors.append(f"{where}: refers to ${ref}, which is not a defined variable")
    for name in defined:
        if name not in used:
            notes.append(f"note: variable ${name} is defined but never used")

    # ---- panels
    panels = list(all_panels(dashboard.get("panels") or []))
    if not panels:
        errors.append("the dashboard has no panels")
    seen_ids = {}
    for p in panels:
        pid = p.get("id")
        if not isinstance(pid, int):
            errors.append(f"{label(p)}: id {pid!r} is not an integer")
        elif pid in seen_ids:
            errors.append(f"{label(p)}: id {pid} is also used by {label(seen_ids[pid])}")
        else:
            seen_ids[pid] = p

    boxes = []
    for p in panels:
        gp = p.get("gridPos") or {}
        try:
            x, y, w, h = (int(gp[k]) for k in ("x", "y", "w", "h"))
        except (KeyError, TypeError, ValueError):
            errors.append(f"{label(p)}: gridPos needs integer x, y, w, h (has {gp!r})")
        else:
            if x < 0 or w <= 0 or h <= 0 or x + w > GRID_COLUMNS:
                errors.append(f"{label(p)}: gridPos {gp} is outside the {GRID_COLUMNS} columns")
            for other, (ox, oy, ow, oh) in boxes:
                if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
                    errors.append(f"{label(p)}: gridPos overlaps {label(other)}")
            boxes.append((p, (x, y, w, h)))

        if p.get("type") == "row":
            continue
        if not p.get("title"):
            errors.append(f"{label(p)}: no title")
        if not (p.get("description") or "").strip():
            errors.append(f"{label(p)}: no description")
        check_datasource(label(p), p.get("datasource"), errors)
        targets = p.get("targets") or []
        if not targets:
            errors.append(f"{label(p)}: no targets")
        ref_ids = set()
        for j, t in enumerate(targets):
            owner = f"{label(p)} target {t.get('refId', j)}"
            if t.get("refId") in ref_ids:
                errors.append(f"{owner}: refId used twice in the panel")
            ref_ids.add(t.get("refId"))
            if "datasource" in t:
                check_datasource(owner, t["datasource"], errors)
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                errors.append(f"{owner}: no expr")
                continue
            check_metrics(owner, expr, errors)

    return errors, notes


# ---- optional: PromQL syntax through promtool

SAMPLE_VALUES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
}


def sample(expr):
    """The expr with Grafana variables replaced by values Prometheus accepts."""
    def repl(m):
        name = next(g for g in m.groups() if g is not None)
        return SAMPLE_VALUES.get(name, ".*")
    return VARIABLE_RE.sub(repl, expr)


def promtool_exprs(dashboard):
    for p in all_panels(dashboard.get("panels") or []):
        for j, t in enumerate(p.get("targets") or []):
            if isinstance(t.get("expr"), str) and t["expr"].strip():
                yield f"{label(p)} target {t.get('refId', j)}", t["expr"]
    for var in (dashboard.get("templating") or {}).get("list") or []:
        if var.get("type") == "query":
            sel = label_values_selector(variable_query(var))
            if sel is not None:
                yield f"variable ${var.get('name')} selector", sel


def check_promql(dashboard):
    """Returns (errors, note). Each expr is checked on its own so a failure names its panel."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return [], "note: promtool not on PATH: PromQL syntax not checked"
    errors = []
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rules.yml")
        for owner, expr in promtool_exprs(dashboard):
            count += 1
            rules = {"groups": [{"name": "dashboard", "rules": [
                {"record": "dashboard:check", "expr": sample(expr)}]}]}
            with open(path, "w") as f:
                json.dump(rules, f)  # JSON is YAML
            run = subprocess.run([promtool, "check", "rules", path],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                out = (run.stdout + run.stderr).strip()
                m = re.search(r"could not parse expression: (.*)", out)
                why = m.group(1).strip() if m else out.replace(path, "rules file")
                errors.append(f"{owner}: promtool cannot parse the PromQL: {why}")
    return errors, f"promtool: {count} PromQL expressions parsed"


def main(argv):
    path = argv[1] if len(argv) > 1 else DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as f:
            dashboard = json.load(f)
    except OSError as e:
        print(f"FAIL: cannot read {path}: {e}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as e:
        print(f"FAIL: {path} is not valid JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(dashboard, dict):
        print(f"FAIL: {path}: the top level is not a JSON object", file=sys.stderr)
        return 2

    errors, notes = check(dashboard)
    promql_errors, promql_note = check_promql(dashboard)
    errors += promql_errors

    panels = list(all_panels(dashboard.get("panels") or []))
    rows = sum(1 for p in panels if p.get("type") == "row")
    targets = sum(len(p.get("targets") or []) for p in panels)
    for n in notes:
        print(n)
    if errors:
        print(f"FAIL: {path}: {len(errors)} problem(s):", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print(f"{promql_note}")
    print(
        f"OK: {path}: {len(panels) - rows} panels in {rows} rows, {targets} queries, "
        f"{len(dashboard['templating']['list'])} variables; ids unique, datasource {DATASOURCE_REF} "
        f"everywhere, metric names known, variables defined"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
