"""infra/prometheus and infra/grafana: every query names what the services really export.

The exported metrics are read from the services' own registries (the edge's through its real
app, the others through the metrics classes their processes build), never from a list kept here.
Every PromQL expression of rules.yml and of the dashboards is taken apart into selectors and
grouping labels and checked against them: metric names, label names, label values where the
service pre-creates its series, counters under rate(), buckets under histogram_quantile().
With ``promtool`` on PATH the files also go through Prometheus's own checks.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from services.cli.up import METRICS_OFFSETS, UpOptions
from services.edge.app import create_app
from services.edge.config import EdgeConfig
from services.edge.state import METRICS
from services.engine.metrics import EngineMetrics
from services.scheduler.metrics import SchedulerMetrics
from services.trainer.metrics import TrainerMetrics

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "infra" / "prometheus"
GRAFANA = REPO / "infra" / "grafana"
DOC = REPO / "docs" / "observability.md"
# Labels Prometheus attaches to every scraped series: `job` and `instance` itself, `service` from
# the targets files. A metric's own `job` label is renamed `exported_job` (honor_labels: false).
TARGET_LABELS = {"job", "instance", "service"}
# Series Prometheus itself synthesizes for every target (not exported by any service).
SCRAPE_SERIES = {"up": set()}
SERVICES = ("edge", "scheduler", "engine", "trainer")

# --- what the services export -----------------------------------------------------------------


@dataclass
class Series:
    """One series name as Prometheus stores it, with the labels it can carry."""

    name: str
    kind: str                                # counter, gauge, histogram (of the family)
    labels: set[str]
    values: dict[str, set[str]]              # label -> values of the series the service pre-creates


def _service_metrics() -> list[object]:
    """The metrics objects as each service builds them, on fresh registries."""
    app = create_app(EdgeConfig())  # the edge's real wiring: create_app registers its metrics
    return [app[METRICS], SchedulerMetrics(CollectorRegistry()), EngineMetrics(CollectorRegistry()),
            TrainerMetrics(CollectorRegistry())]


def _exported() -> dict[str, Series]:
    """Every series name the services expose, from their registries."""
    out: dict[str, Series] = {}
    for metrics in _service_metrics():
        registry: CollectorRegistry = metrics.registry
        labels_of = {c._name: set(c._labelnames) for c in vars(metrics).values() if isinstance(c, MetricWrapperBase)}
        families = list(registry.collect())
        assert families, f"{type(metrics).__name__} registers no metric"
        for family in families:
            # Counter families drop `_total` from their name; the wrappers keep what was declared.
            declared = family.name + "_total" if family.type == "counter" else family.name
            labels = labels_of.get(declared, labels_of.get(family.name))
            assert labels is not None, f"{family.name} is registered but not an attribute of {type(metrics).__name__}"
            if "job" in labels:
                labels = (labels - {"job"}) | {"exported_job"}
            suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
            assert family.type in suffixes, f"{family.name}: unexpected type {family.type}"
            values: dict[str, set[str]] = {}
            for sample in family.samples:
                for key, value in sample.labels.items():
                    values.setdefault(key, set()).add(value)
            for suffix in suffixes[family.type]:
                extra = {"le"} if suffix == "_bucket" else set()
                out[family.name + suffix] = Series(family.name + suffix, family.type, labels | extra, values)
    return out


EXPORTED = _exported()


def test_the_registries_hold_the_documented_families():
    # A sanity anchor for the introspection above: one series of each service and kind.
    for name in ("llm_edge_requests_total", "llm_edge_time_to_first_token_seconds_bucket", "llm_edge_open_streams",
                 "llm_scheduler_queue_pending", "llm_engine_generated_tokens_total", "llm_trainer_step_seconds_count"):
        assert name in EXPORTED
    assert EXPORTED["llm_edge_rejected_requests_total"].labels == {"reason"}
    assert EXPORTED["llm_trainer_last_loss"].labels == {"exported_job"}
    assert EXPORTED["llm_scheduler_queue_pending"].values["lane"] == {"high", "normal", "low"}


# --- a small PromQL reader ---------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<braces>\{[^{}]*\})
  | (?P<range>\[[^\[\]]*\])
  | (?P<number>(?<![\w:])[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<var>\$\{?\w+\}?)
  | (?P<space>\s+)
  | (?P<op>==|!=|>=|<=|=~|!~|[-+*/%^<>(),])
""", re.VERBOSE)
_MATCHER = re.compile(r"""\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?""")
# PromQL functions and aggregations these files may use (a typo is an error, not a metric name).
FUNCTIONS = {"sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "rate", "irate", "increase",
             "histogram_quantile", "abs", "vector", "scalar", "clamp_min", "clamp_max", "max_over_time",
             "min_over_time", "avg_over_time", "absent", "label_replace", "predict_linear", "delta", "deriv"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "Inf", "NaN"}


@dataclass
class Selector:
    """A metric name with its label matchers (label, operator, value)."""

    name: str
    matchers: list[tuple[str, str, str]]


@dataclass
class Parsed:
    """What a PromQL expression refers to."""

    selectors: list[Selector]
    grouping: set[str]
    functions: set[str]


def _tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of ``expr``, whitespace dropped; anything unreadable fails the test."""
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match, f"cannot read {expr[pos:pos + 20]!r} in {expr!r}"
        if match.lastgroup != "space":
            out.append((match.lastgroup, match.group()))
        pos = match.end()
    return out


def parse_promql(expr: str) -> Parsed:
    """Selectors, grouping labels and functions of ``expr``; checks parentheses balance."""
    tokens = _tokens(expr)
    depth = 0
    for kind, text in tokens:
        depth += {"(": 1, ")": -1}.get(text, 0) if kind == "op" else 0
        assert depth >= 0, f"unbalanced ')' in {expr!r}"
    assert depth == 0, f"unbalanced '(' in {expr!r}"
    selectors, grouping, functions = [], set(), set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in GROUPING:
            assert following == ("op", "("), f"{text} without a label list in {expr!r}"
            j = i + 2
            while tokens[j] != ("op", ")"):
                if tokens[j][0] == "ident":
                    grouping.add(tokens[j][1])
                j += 1
            i = j + 1
            continue
        if kind == "ident" and (following == ("op", "(") or following[1] in ("by", "without")):
            assert text in FUNCTIONS, f"unknown function {text}() in {expr!r}"
            functions.add(text)
        elif kind == "ident" and text not in KEYWORDS:
            matchers = []
            if following[0] == "braces":
                body = following[1][1:-1]
                matchers = [m.groups() for m in _MATCHER.finditer(body)]
                assert "".join(m.group() for m in _MATCHER.finditer(body)).strip() == body.strip(), \
                    f"unreadable matchers {following[1]} in {expr!r}"
            selectors.append(Selector(text, matchers))
        elif kind == "braces":
            assert i > 0 and tokens[i - 1][0] == "ident", f"a selector without a metric name in {expr!r}"
        i += 1
    return Parsed(selectors, grouping, functions)


def test_the_promql_reader_finds_names_labels_and_functions():
    parsed = parse_promql('histogram_quantile(0.95, sum by (route, le) (rate(llm_edge_latency_seconds_bucket'
                          '{route=~"$route", kind!="x"}[$__rate_interval]))) > on () group_left () 2e3 * x:y:z')
    assert [(s.name, s.matchers) for s in parsed.selectors] == [
        ("llm_edge_latency_seconds_bucket", [("route", "=~", "$route"), ("kind", "!=", "x")]), ("x:y:z", [])]
    assert parsed.grouping == {"route", "le"}
    assert parsed.functions == {"histogram_quantile", "sum", "rate"}
    with pytest.raises(AssertionError):
        parse_promql("sum(rate(x[5m])")
    with pytest.raises(AssertionError):
        parse_promql("sume(x)")


# --- rules.yml -----------------------------------------------------------------------------------

RULES = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())
RULE_LIST = [rule for group in RULES["groups"] for rule in group["rules"]]
RECORDS = [r for r in RULE_LIST if "record" in r]
ALERTS = [r for r in RULE_LIST if "alert" in r]
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
_TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")


def _record_labels(record: dict) -> set[str]:
    """Labels a record keeps: its level (``route_status:…`` keeps route and status) and its own labels."""
    level = record["record"].split(":")[0]
    kept = set() if level in ("", "cy") else set(level.split("_"))
    return kept | set(record.get("labels", {}))


RECORDED = {r["record"]: Series(r["record"], "recorded", _record_labels(r), {}) for r in RECORDS}
KNOWN = {**EXPORTED, **RECORDED, **{n: Series(n, "scrape", set(), {}) for n in SCRAPE_SERIES}}


def check_expression(expr: str, where: str) -> set[str]:
    """Assert ``expr`` refers only to real series and labels; the labels its series can carry."""
    parsed = parse_promql(expr)
    assert parsed.selectors or parsed.functions == {"vector"}, f"{where}: no metric in {expr!r}"
    available = set(TARGET_LABELS)
    for selector in parsed.selectors:
        series = KNOWN.get(selector.name)
        assert series is not None, f"{where}: {selector.name} is neither exported by a service nor recorded"
        allowed = series.labels | (TARGET_LABELS if series.kind != "recorded" else set())
        available |= allowed
        for label, op, value in selector.matchers:
            assert label in allowed, f"{where}: {selector.name} has no label {label!r} (it has {sorted(allowed)})"
            known_values = series.values.get(label)
            if op in ("=", "!=") and known_values and "$" not in value:
                assert value in known_values, f"{where}: {selector.name}{{{label}}} is never {value!r}"
    missing = parsed.grouping - available - {"le"}
    assert not missing, f"{where}: grouping by {sorted(missing)}, which no series of {expr!r} carries"
    for fn, name in re.findall(r"\b(rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)", expr):
        assert KNOWN[name].kind in ("counter", "histogram"), f"{where}: {fn}() of {name}, which is no counter"
    for inner in re.findall(r"histogram_quantile\(\s*[\d.]+\s*,(.*)", expr):
        assert "_bucket" in inner and "le" in parse_promql(inner.rsplit(")", 1)[0]).grouping, \
            f"{where}: histogram_quantile() needs _bucket series grouped by le"
    return available


def test_rules_file_has_the_prometheus_rule_file_structure():
    assert set(RULES) == {"groups"}
    names = [g["name"] for g in RULES["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in RULES["groups"]:
        assert set(group) <= {"name", "interval", "limit", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            allowed = {"record", "expr", "labels"} if "record" in rule else \
                {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
            assert set(rule) <= allowed, f"unknown keys {set(rule) - allowed} in {rule}"
            assert "for" not in rule or _DURATION.match(rule["for"]), rule["for"]
            assert all(isinstance(v, str) for v in rule.get("labels", {}).values()), "label values must be strings"
    for record in RECORDS:
        assert re.fullmatch(r"[a-z_]*:[a-z0-9_]+(:[a-z0-9_]+)?", record["record"]), record["record"]
    alert_names = [a["alert"] for a in ALERTS]
    assert len(alert_names) == len(set(alert_names))


def test_rules_use_only_exported_metrics_and_labels():
    for record in RECORDS:
        available = check_expression(record["expr"], record["record"])
        # The level names the labels the record keeps: they must exist in what it aggregates.
        assert _record_labels(record) - set(record.get("labels", {})) <= available, record["record"]
    for alert in ALERTS:
        available = check_expression(alert["expr"], alert["alert"])
        referenced = set()
        for text in alert.get("annotations", {}).values():
            referenced |= set(_TEMPLATE_LABEL.findall(text))
        missing = referenced - available - set(alert.get("labels", {}))
        assert not missing, f"{alert['alert']}: annotations use $labels.{sorted(missing)}, absent from its series"


def test_every_record_is_used_and_defined_once_per_label_set():
    keys = [(r["record"], tuple(sorted(r.get("labels", {}).items()))) for r in RECORDS]
    assert len(keys) == len(set(keys))
    readers = [a["expr"] for a in ALERTS] + [r["expr"] for r in RECORDS] + [t["expr"] for d in DASHBOARDS.values()
                                                                              for _, t in _targets(d)]
    read = {s.name for expr in readers for s in parse_promql(expr).selectors}
    assert not set(RECORDED) - read, f"records nothing reads: {sorted(set(RECORDED) - read)}"


def test_alerts_an_operator_needs_are_there_with_severity_and_runbook():
    by_name = {a["alert"]: a for a in ALERTS}
    for needed in ("EdgeDown", "ScrapeTargetDown", "NoHealthyWorkers", "InferenceQueueNearBound",
                   "InferenceQueueFull", "EdgeHighErrorRate", "EdgeRejections", "CircuitBreakerOpen",
                   "EngineMemoryNearBudget", "TrainerJobFailed"):
        assert needed in by_name
    doc = DOC.read_text()
    headings = {line[4:].strip() for line in doc.splitlines() if line.startswith("### ")}
    for alert in ALERTS:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        notes = alert["annotations"]
        assert notes.get("summary") and notes.get("description"), alert["alert"]
        assert notes["runbook"] == f"docs/observability.md#{alert['alert'].lower()}"
        assert alert["alert"] in headings, f"docs/observability.md has no '### {alert['alert']}' runbook"


def test_queue_alert_threshold_is_the_streams_bound():
    streams = tomllib.loads((REPO / "infra" / "nats" / "jetstream.toml").read_text())["streams"]
    bound = streams["LLM_INFER"]["max_msgs"]
    expr = next(a["expr"] for a in ALERTS if a["alert"] == "InferenceQueueNearBound")
    match = re.search(r">\s*0\.\d+\s*\*\s*(\d+)", expr)
    assert match and int(match.group(1)) == bound, f"{expr!r} must compare against LLM_INFER max_msgs {bound}"


# --- prometheus.yml ------------------------------------------------------------------------------

CONFIG = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())


def _target_groups() -> Iterator[tuple[str, dict]]:
    for job in CONFIG["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            for pattern in sd["files"]:
                files = sorted(PROMETHEUS.glob(pattern))
                assert files, f"{job['job_name']}: no targets file matches {pattern}"
                for path in files:
                    for group in yaml.safe_load(path.read_text()):
                        yield job["job_name"], group
        for group in job.get("static_configs", []):
            yield job["job_name"], group


def test_scrape_config_covers_every_service_with_service_labels():
    assert all((PROMETHEUS / f).is_file() for f in CONFIG["rule_files"])
    jobs = [job["job_name"] for job in CONFIG["scrape_configs"]]
    assert sorted(jobs) == sorted(SERVICES)
    ports: dict[str, set[int]] = {}
    for job, group in _target_groups():
        assert group["labels"]["service"] == job
        assert set(group) <= {"targets", "labels"} and group["targets"]
        for target in group["targets"]:
            host, port = target.rsplit(":", 1)
            assert host == "127.0.0.1", "every service binds loopback under ./cy up"
            ports.setdefault(job, set()).add(int(port))
    defaults = UpOptions(state_dir=Path("."))
    assert ports["edge"] == {defaults.port}, "the edge serves /metrics on ./cy up's HTTP port"
    every = [p for s in ports.values() for p in s]
    assert len(every) == len(set(every)) and defaults.nats_port not in every
    for service, offset in METRICS_OFFSETS.items():
        assert ports[service] == {defaults.metrics_port + offset}, \
            f"the {service} target must be the port ./cy up gives it (--metrics-port + {offset})"


def test_nats_monitoring_json_is_not_scraped_directly():
    # /varz and friends are JSON: scraping them fails every time. Only an exporter may be a target.
    monitor_ports = {int(m) for conf in (REPO / "infra" / "nats").rglob("*.conf")
                     for m in re.findall(r"^\s*http(?:_port)?\s*:\s*(?:[\d.]+:)?(\d+)", conf.read_text(), re.M)}
    assert monitor_ports, "the cluster configs serve monitoring; this test should see their ports"
    for job, group in _target_groups():
        for target in group["targets"]:
            assert int(target.rsplit(":", 1)[1]) not in monitor_ports | {8222}, f"{job} scrapes NATS monitoring JSON"


# --- Grafana ---------------------------------------------------------------------------------------

def _builder():
    spec = importlib.util.spec_from_file_location("cy_build_dashboards", GRAFANA / "build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


BUILDER = _builder()
DASHBOARDS = {p.name: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def _targets(dashboard: dict) -> Iterator[tuple[dict, dict]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_files_are_exactly_what_the_generator_writes():
    rendered = BUILDER.rendered_files()
    on_disk = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert sorted(on_disk) == sorted(rendered)
    stale = [name for name in rendered if on_disk[name] != rendered[name]]
    assert not stale, f"run python infra/grafana/build_dashboards.py: {stale} differ"
    assert BUILDER.main(["--check"]) == 0


def test_dashboards_are_well_formed_and_use_the_provisioned_datasource():
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].endswith(":9090")
    uids = [d["uid"] for d in DASHBOARDS.values()]
    assert len(uids) == len(set(uids)) == 4
    for name, dashboard in DASHBOARDS.items():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: {panel['title']} is wider than the grid"
            area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not area & cells, f"{name}: {panel['title']} overlaps another panel"
            cells |= area
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == source["uid"] and panel["targets"], panel["title"]
        refs = [t["datasource"]["uid"] for _, t in _targets(dashboard)]
        refs += [v["datasource"]["uid"] for v in dashboard["templating"]["list"]]
        assert set(refs) == {source["uid"]}, f"{name}: datasource uids {set(refs)}"
        for link in dashboard["links"]:
            assert link["url"].removeprefix("/d/") in uids


def test_dashboard_queries_use_only_exported_metrics_and_labels():
    for name, dashboard in DASHBOARDS.items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        for var in variables.values():
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"]).groups()
            assert label in EXPORTED[metric].labels | TARGET_LABELS, f"{name}: ${var['name']}"
        for panel, target in _targets(dashboard):
            check_expression(target["expr"], f"{name} / {panel['title']}")
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range", "__interval"}
            assert used <= set(variables), f"{name} / {panel['title']}: undefined variables {used - set(variables)}"
            for legend_label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]):
                assert legend_label in check_expression(target["expr"], panel["title"]) | {"le"}, \
                    f"{name} / {panel['title']}: legend uses {legend_label}"


def _series_behind(expr: str) -> set[str]:
    """Exported series ``expr`` reads, through any records it uses."""
    out = set()
    for selector in parse_promql(expr).selectors:
        if selector.name in RECORDED:
            for record in RECORDS:
                if record["record"] == selector.name:
                    out |= _series_behind(record["expr"])
        else:
            out.add(selector.name)
    return out


def test_dashboards_cover_what_operators_watch():
    shown = {name: set().union(*(_series_behind(t["expr"]) for _, t in _targets(d))) for name, d in DASHBOARDS.items()}
    wanted = {
        "overview.json": {"llm_edge_requests_total", "llm_edge_latency_seconds_bucket",
                          "llm_edge_time_to_first_token_seconds_bucket", "llm_edge_open_streams",
                          "llm_edge_rejected_requests_total", "llm_scheduler_queue_pending",
                          "llm_scheduler_cache_hits_total", "llm_scheduler_workers_healthy"},
        "engines.json": {"llm_engine_generated_tokens_total", "llm_engine_time_to_first_token_seconds_bucket",
                         "llm_engine_inter_token_latency_seconds_bucket", "llm_engine_in_flight_requests",
                         "llm_engine_memory_used_bytes", "llm_engine_models_loaded", "llm_engine_adapters_loaded",
                         "llm_engine_adapter_loads_total", "llm_engine_adapter_evictions_total"},
        "scheduler.json": {"llm_scheduler_dispatch_latency_seconds_bucket", "llm_scheduler_dispatch_attempts_total",
                           "llm_edge_failovers_total", "llm_scheduler_circuits_open"},
        "training.json": {"llm_trainer_jobs_total", "llm_trainer_steps_total", "llm_trainer_last_loss",
                          "llm_trainer_checkpoint_writes_total"},
    }
    for name, metrics in wanted.items():
        assert metrics <= shown[name], f"{name} does not show {sorted(metrics - shown[name])}"
    # Nothing a service exports is left off every dashboard.
    every = set().union(*shown.values())
    required = {n for n, series in EXPORTED.items() if series.kind != "histogram" or n.endswith("_bucket")}
    unshown = required - every
    assert not unshown, f"exported but on no dashboard: {sorted(unshown)}"


def test_dashboard_provider_points_at_the_generated_files():
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cy-llm.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    variable = provider["options"]["path"].removeprefix("$")
    assert f"{variable}=$PWD/infra/grafana/dashboards" in DOC.read_text()


# --- promtool, when installed ----------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian: apt-get install prometheus)")
def test_promtool_accepts_rules_and_config():
    for args in (["check", "rules", str(PROMETHEUS / "rules.yml")],
                 ["check", "config", str(PROMETHEUS / "prometheus.yml")]):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian: apt-get install prometheus)")
def test_promtool_parses_every_dashboard_query(tmp_path: Path):
    # Prometheus's own parser reads each panel query as a recording rule, Grafana variables filled in.
    rules = []
    for name, dashboard in DASHBOARDS.items():
        for panel, target in _targets(dashboard):
            expr = re.sub(r"\$__\w+", "1m", target["expr"])
            expr = re.sub(r"\$\w+", ".*", expr)
            rules.append({"record": f"dashboard:{name.removesuffix('.json')}:p{panel['id']}{target['refId']}",
                          "expr": expr})
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
