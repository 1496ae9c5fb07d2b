"""Write CY-LLM's Grafana dashboards (``infra/grafana/dashboards/*.json``) from the definitions below.

The JSON files are generated, never edited by hand: change a panel here, then run
``python infra/grafana/build_dashboards.py`` (``--check`` only reports whether the committed files
are current, as tests/infra/test_infra_observability.py does). Only the standard library is used, so
the script runs with any Python 3.11.

Every query uses metric names the services export (services/*/metrics.py) or a record of
infra/prometheus/rules.yml, and the datasource provisioned in
infra/grafana/provisioning/datasources/prometheus.yml (uid ``cy-prometheus``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DATASOURCE_UID = "cy-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
OUT_DIR = Path(__file__).resolve().parent / "dashboards"
RATE = "$__rate_interval"
GRID_WIDTH = 24
ENGINE = 'instance=~"$instance", model=~"$model"'  # the engine dashboard's filter


@dataclass(frozen=True)
class Query:
    """One PromQL expression and its legend."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel: ``timeseries`` by default, ``stat`` for a single current value."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    stack: bool = False


@dataclass(frozen=True)
class Variable:
    """A multi-value template variable filled from ``label_values(metric, label)``."""

    name: str
    metric: str
    label: str

    @property
    def query(self) -> str:
        """The Grafana query that lists the variable's values."""
        return f"label_values({self.metric}, {self.label})"


@dataclass(frozen=True)
class Dashboard:
    """A dashboard: rows of panels laid out left to right, wrapping at the grid's width."""

    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[Panel, ...]], ...]
    variables: tuple[Variable, ...] = field(default_factory=tuple)


def q(expr: str, legend: str = "") -> Query:
    """Shorthand for a query."""
    return Query(expr, legend)


def quantiles(metric: str, by: str, selector: str = "", levels: tuple[float, ...] = (0.5, 0.95, 0.99),
              legend: str = "") -> tuple[Query, ...]:
    """``histogram_quantile`` of ``metric`` at each level, grouped by ``by`` (and ``le``)."""
    group = f"{by}, le" if by else "le"
    return tuple(q(f"histogram_quantile({level}, sum by ({group}) (rate({metric}_bucket{selector}[{RATE}])))",
                   f"p{round(level * 100)} {legend}".strip()) for level in levels)


# --- the dashboards --------------------------------------------------------------------------

OVERVIEW = Dashboard(
    uid="cy-llm-overview",
    title="CY-LLM / Overview",
    description="The platform at a glance: traffic and latency at the edge, the queue, engines and the prompt cache.",
    variables=(Variable("route", "llm_edge_requests_total", "route"),),
    rows=(
        ("Health", (
            Panel("Healthy engines", (q("max(llm_scheduler_workers_healthy)"),), kind="stat", width=4, height=4,
                  description="Live, non-draining engines as the schedulers see them (0 = every request waits)."),
            Panel("Requests/s", (q(f'sum(rate(llm_edge_requests_total{{route=~"$route"}}[{RATE}]))'),),
                  unit="reqps", kind="stat", width=4, height=4),
            Panel("5xx ratio", (q("cy:llm_edge_requests_5xx:ratio_rate5m"),), unit="percentunit", kind="stat",
                  width=4, height=4),
            Panel("Queued requests", (q("cy:llm_scheduler_queue_pending:sum"),), kind="stat", width=4, height=4,
                  description="Messages waiting in LLM_INFER (bound: 1000, then 429 queue_full)."),
            Panel("Open streams", (q("sum(llm_edge_open_streams)"),), kind="stat", width=4, height=4),
            Panel("Prompt cache hit rate (5m)", (q("cy:prompt_cache_hit:ratio_rate5m"),), unit="percentunit",
                  kind="stat", width=4, height=4,
                  description="Hits answered by the edges and by the schedulers, over all cacheable lookups."),
        )),
        ("Edge", (
            Panel("Requests/s by route and status",
                  (q('route_status:llm_edge_requests:rate5m{route=~"$route"}', "{{route}} {{status}}"),),
                  unit="reqps", stack=True),
            Panel("Latency to last byte by route",
                  (q('route:llm_edge_latency_seconds:quantile5m{route=~"$route"}', "p{{quantile}} {{route}}"),),
                  unit="s", description="Request arrival to its last byte; a stream counts until its end."),
            Panel("Time to first token by route and kind",
                  (q('route_kind:llm_edge_time_to_first_token_seconds:quantile5m{route=~"$route", quantile=~"0.5|0.95"}',
                     "p{{quantile}} {{route}} {{kind}}"),), unit="s",
                  description="As the client sees it: SSE headers + first chunk, first WebSocket frame, or the "
                              "whole body of an answer that is not streamed."),
            Panel("Open streams and requests in flight",
                  (q('sum by (route, kind) (llm_edge_open_streams{route=~"$route"})', "{{route}} {{kind}}"),
                   q("sum(llm_edge_in_flight_requests)", "in flight (all routes)")), unit="short"),
            Panel("Rejections by reason", (q("reason:llm_edge_rejected_requests:rate5m", "{{reason}}"),),
                  unit="reqps", stack=True),
            Panel("Rate-limited (429) by budget, failovers by outcome, slow consumers cut",
                  (q(f"sum by (reason) (rate(llm_edge_rate_limited_total[{RATE}]))", "429 {{reason}}"),
                   q(f"sum by (outcome) (rate(llm_edge_failovers_total[{RATE}]))", "failover {{outcome}}"),
                   q(f"sum(rate(llm_edge_slow_consumers_total[{RATE}]))", "slow consumers cut")),
                  unit="reqps"),
            Panel("Batch lines recorded/s by outcome",
                  (q(f"sum by (outcome) (rate(llm_edge_batch_lines_total[{RATE}]))", "{{outcome}}"),),
                  unit="reqps", stack=True,
                  description="Lines of /v1/batches run on the low lane: ok, err (refused by the endpoint), "
                              "skip (cancelled or expired). Progress of one batch: GET /v1/batches/{id}."),
        )),
        ("Queue and engines", (
            Panel("Queue depth per lane", (q("lane:llm_scheduler_queue_pending:max", "{{lane}}"),), stack=True,
                  width=8),
            Panel("Prompt cache hit rate", (q("cy:prompt_cache_hit:ratio_rate5m", "last 5m (edges and schedulers)"),
                                            q("max(llm_scheduler_cache_hit_ratio)",
                                              "since scheduler start (the scheduler's own lookups)")),
                  unit="percentunit", width=8,
                  description="The edges answer most hits of HTTP requests themselves; those never reach a "
                              "scheduler, so its own rate counts only what passed the edge (mostly misses)."),
            Panel("Healthy engines and open circuit breakers",
                  (q("max(llm_scheduler_workers_healthy)", "healthy engines"),
                   q("max(llm_scheduler_circuits_open)", "circuits open")), width=8),
            Panel("Tokens generated/s", (q("sum by (model) (instance_model:llm_engine_generated_tokens:rate1m)",
                                           "{{model}}"),), unit="short", stack=True, width=24),
        )),
        ("Processes", (
            Panel("Garbage-collector pauses, p99 by service",
                  tuple(q(f"histogram_quantile(0.99, sum by (instance, le) "
                          f"(rate(llm_{service}_gc_pause_seconds_bucket[{RATE}])))", f"{service} {{{{instance}}}}")
                        for service in ("edge", "scheduler", "engine", "trainer")),
                  unit="s", width=24,
                  description="Every thread of the process stops while Python's collector runs. Each service "
                              "freezes its start-up heap, so full collections stay in milliseconds; hundreds "
                              "of milliseconds here mean a heap that grew since (docs/observability.md)."),
        )),
    ),
)

ENGINES = Dashboard(
    uid="cy-llm-engines",
    title="CY-LLM / Engines",
    description="Per engine and model: throughput, latency, load, memory, models and adapters.",
    variables=(Variable("instance", "llm_engine_in_flight_requests", "instance"),
               Variable("model", "llm_engine_requests_total", "model")),
    rows=(
        ("Throughput", (
            Panel("Tokens generated/s", (q(f"instance_model:llm_engine_generated_tokens:rate1m{{{ENGINE}}}",
                                           "{{instance}} {{model}}"),), stack=True),
            Panel("Prompt tokens/s", (q(f"instance_model:llm_engine_prompt_tokens:rate1m{{{ENGINE}}}",
                                        "{{instance}} {{model}}"),), stack=True),
            Panel("Requests finished by outcome",
                  (q(f"sum by (instance, model, outcome) (rate(llm_engine_requests_total{{{ENGINE}}}[{RATE}]))",
                     "{{instance}} {{model}} {{outcome}}"),), unit="reqps", stack=True, width=24),
        )),
        ("Latency", (
            Panel("Time to first token", (q(f"instance_model:llm_engine_time_to_first_token_seconds:quantile5m{{{ENGINE}}}",
                                            "p{{quantile}} {{instance}} {{model}}"),), unit="s", width=8,
                  description="Accepted by the engine to its first token (queueing at the edge not included)."),
            Panel("Inter-token latency", (q(f"instance_model:llm_engine_inter_token_latency_seconds:quantile5m{{{ENGINE}}}",
                                            "p{{quantile}} {{instance}} {{model}}"),), unit="s", width=8,
                  description="Mean time between tokens of each request."),
            Panel("Inference latency", (q(f"instance_model:llm_engine_inference_latency_seconds:quantile5m{{{ENGINE}}}",
                                          "p{{quantile}} {{instance}} {{model}}"),), unit="s", width=8,
                  description="Accepted to last token."),
        )),
        ("Load and memory", (
            Panel("Requests in flight", (q('sum by (instance) (llm_engine_in_flight_requests{instance=~"$instance"})',
                                           "{{instance}}"),), width=8),
            Panel("Memory used", (q('llm_engine_memory_used_bytes{instance=~"$instance"}', "{{instance}}"),
                                  q("cy:engine_memory_budget:bytes > 0", "budget (rules.yml)")), unit="bytes",
                  width=8, description="GPU memory on GPU, RSS on CPU; the budget line shows once it is set in "
                                       "infra/prometheus/rules.yml."),
            Panel("Models and adapters loaded",
                  (q('llm_engine_models_loaded{instance=~"$instance"}', "models {{instance}}"),
                   q('llm_engine_adapters_loaded{instance=~"$instance"}', "adapters {{instance}}")), width=8),
            Panel("Adapter loads and evictions",
                  (q(f'sum by (instance) (rate(llm_engine_adapter_loads_total{{instance=~"$instance"}}[{RATE}]))',
                     "loads {{instance}}"),
                   q(f'sum by (instance) (rate(llm_engine_adapter_evictions_total{{instance=~"$instance"}}[{RATE}]))',
                     "evictions {{instance}}")), unit="ops", width=24,
                  description="Evictions keep pace with loads when more adapters are in use than fit: raise the "
                              "adapter slots or spread them over engines."),
            Panel("Prompt-prefix reuse (transformers)",
                  (q(f'sum by (instance) (rate(llm_engine_prefix_cache_hits_total{{instance=~"$instance"}}[{RATE}]))',
                     "hits {{instance}}"),
                   q(f'sum by (instance) (rate(llm_engine_prefix_cache_misses_total{{instance=~"$instance"}}'
                     f'[{RATE}]))', "misses {{instance}}"),
                   q(f'sum by (instance) (rate(llm_engine_prefix_cache_reused_tokens_total{{instance=~"$instance"}}'
                     f'[{RATE}]))', "tokens reused {{instance}}")), unit="ops", width=16,
                  description="Prompts whose leading tokens' KV was reused from a recent prompt of the same model "
                              "and adapter (system prompt, earlier turns), and the prompt tokens not prefilled."),
            Panel("Prompt-prefix KV held", (q('llm_engine_prefix_cache_bytes{instance=~"$instance"}', "{{instance}}"),),
                  unit="bytes", width=8, description="At most --prefix-cache-bytes per model."),
            Panel("Join window: steps held for new requests",
                  (q(f'sum by (instance) (rate(llm_engine_join_holds_total{{instance=~"$instance"}}[{RATE}]))',
                     "holds {{instance}}"),
                   q(f'sum by (instance) (rate(llm_engine_join_requests_total{{instance=~"$instance"}}[{RATE}]))',
                     "requests joined {{instance}}"),
                   q(f'sum by (instance) (rate(llm_engine_join_hold_seconds_total{{instance=~"$instance"}}'
                     f'[{RATE}]))', "seconds held per second {{instance}}")), unit="ops", width=24,
                  description="After a step that finished requests, the model thread waits up to --join-window-ms "
                              "(a quarter step at most) for their replacements, while such holds see requests come "
                              "in: each joined request starts a step sooner. Holds without joins mean open-loop "
                              "traffic (an occasional probe)."),
            Panel("Health checks that were not ok",
                  (q(f'sum by (instance, health) (rate(llm_engine_health_checks_total'
                     f'{{instance=~"$instance", health!="ok"}}[{RATE}]))', "{{health}} {{instance}}"),),
                  unit="ops", width=24,
                  description="Each engine checks its backends every heartbeat interval. failed: a dead model "
                              "thread or engine core (no work goes to it, its requests fail over); degraded: a "
                              "check too slow to answer. The reason is in /v1/cluster/status."),
        )),
        ("Structured outputs", (
            Panel("Grammar compile time",
                  (q(f'histogram_quantile(0.99, sum by (instance, le) (rate(llm_engine_grammar_compile_seconds_bucket'
                     f'{{instance=~"$instance"}}[{RATE}])))', "p99 {{instance}}"),
                   q(f'sum by (instance) (rate(llm_engine_grammar_compile_seconds_count{{instance=~"$instance"}}'
                     f'[{RATE}]))', "compiles/s {{instance}}")), unit="s", width=24,
                  description="Compiling a response_format / structured_outputs constraint (cache misses only); "
                              "a constraint past the engine's time limit is refused with invalid_request."),
        )),
    ),
)

SCHEDULER = Dashboard(
    uid="cy-llm-scheduler",
    title="CY-LLM / Scheduler",
    description="Dispatch from the JetStream queue to engines: latency, outcomes, retries, failovers, circuit breakers.",
    variables=(Variable("lane", "llm_scheduler_queue_pending", "lane"),),
    rows=(
        ("Queue", (
            Panel("Queue depth per lane", (q('lane:llm_scheduler_queue_pending:max{lane=~"$lane"}', "{{lane}}"),),
                  stack=True, width=8),
            Panel("Queue wait (created to accepted)",
                  (q('lane:llm_scheduler_queue_wait_seconds:quantile5m{lane=~"$lane"}', "p{{quantile}} {{lane}}"),),
                  unit="s", width=8),
            Panel("Dispatch latency (taken to accepted)",
                  (q('lane:llm_scheduler_dispatch_latency_seconds:quantile5m{lane=~"$lane"}', "p{{quantile}} {{lane}}"),),
                  unit="s", width=8),
        )),
        ("Outcomes and retries", (
            Panel("Messages by outcome",
                  (q('lane_outcome:llm_scheduler_inference_requests:rate5m{lane=~"$lane"}', "{{lane}} {{outcome}}"),),
                  unit="ops", stack=True,
                  description="deferred = no engine could take it now, retried later; expired = deadline passed "
                              "in the queue; cached = answered from the prompt cache."),
            Panel("Sends to engines by result, and retries",
                  (q(f"sum by (result) (rate(llm_scheduler_dispatch_attempts_total[{RATE}]))", "{{result}}"),
                   q(f"sum(rate(llm_scheduler_dispatch_retries_total[{RATE}]))", "retried on another engine")),
                  unit="ops",
                  description="busy, refused and no_reply sends are retried on another engine (up to max_attempts), "
                              "then the message goes back to the queue (outcome deferred)."),
            Panel("Failovers and migrations",
                  (q(f"sum by (outcome) (rate(llm_edge_failovers_total[{RATE}]))", "edge decided: {{outcome}}"),
                   q(f"sum by (kind) (rate(llm_scheduler_failover_dispatches_total[{RATE}]))", "dispatched: {{kind}}"),
                   q(f"sum(rate(llm_scheduler_worker_lost_requests_total[{RATE}]))", "NATS producers told worker_lost")),
                  unit="ops",
                  description="The edge decides (redispatched before the first token, migrated mid-stream, "
                              "impossible = the request ended with its engine); schedulers count the failover "
                              "attempts engines accepted, and the requests of NATS-native producers (no "
                              "migration for them) they ended with worker_lost because the engine died."),
            Panel("Prompt cache", (q(f"sum by (source) (rate(llm_edge_cache_hits_total[{RATE}]))",
                                     "edge hits from {{source}}"),
                                   q(f"sum(rate(llm_edge_cache_misses_total[{RATE}]))", "edge misses (to the queue)"),
                                   q(f"sum(rate(llm_scheduler_cache_hits_total[{RATE}]))", "scheduler hits"),
                                   q(f"sum(rate(llm_scheduler_cache_misses_total[{RATE}]))", "scheduler misses"),
                                   q(f"sum(rate(llm_scheduler_cache_local_hits_total[{RATE}]))",
                                     "scheduler hits served from the replica's memory")),
                  unit="ops",
                  description="The edge answers hits of HTTP requests itself (from its memory mirror or one KV "
                              "read); its misses go to the queue, where a scheduler looks again. Scheduler "
                              "memory hits are the part of its hits answered without a KV read."),
        )),
        ("Engines as the scheduler sees them", (
            Panel("Healthy engines per replica", (q("llm_scheduler_workers_healthy", "{{instance}}"),)),
            Panel("Open circuit breakers per replica", (q("llm_scheduler_circuits_open", "{{instance}}"),),
                  description="Engines not sent to because dispatches to them went unanswered."),
        )),
    ),
)

TRAINING = Dashboard(
    uid="cy-llm-training",
    title="CY-LLM / Training",
    description="Fine-tuning jobs: status, progress, loss, checkpoints.",
    rows=(
        ("Jobs", (
            Panel("Jobs running", (q("sum(llm_trainer_jobs_running)"),), kind="stat", width=6, height=5),
            Panel("Jobs ended in the last hour by status", (q("status:llm_trainer_jobs:increase1h", "{{status}}"),),
                  kind="stat", width=18, height=5),
            Panel("Jobs reaching a status",
                  (q(f"sum by (status) (increase(llm_trainer_jobs_total[{RATE}]))", "{{status}}"),), stack=True,
                  width=24),
        )),
        ("Progress", (
            Panel("Optimizer steps/s", (q("instance:llm_trainer_steps:rate5m", "{{instance}}"),), unit="ops", width=8),
            Panel("Step time", quantiles("llm_trainer_step_seconds", "instance", "", (0.5, 0.95), "{{instance}}"),
                  unit="s", width=8),
            Panel("Tokens trained/s", (q(f"sum by (instance) (rate(llm_trainer_tokens_trained_total[{RATE}]))",
                                         "{{instance}}"),), width=8),
            # The metric's own `job` label (the job id) is renamed exported_job by Prometheus,
            # whose target label `job` (the scrape job) takes precedence.
            Panel("Loss of the last step", (q("llm_trainer_last_loss", "{{exported_job}}"),), width=24,
                  description="One series per running job, gone when the job ends."),
        )),
        ("Checkpoints", (
            Panel("Checkpoints written", (q(f"sum by (instance) (increase(llm_trainer_checkpoint_writes_total[{RATE}]))",
                                            "{{instance}}"),)),
            Panel("Checkpoint bytes/s", (q(f"sum by (instance) (rate(llm_trainer_checkpoint_bytes_total[{RATE}]))",
                                           "{{instance}}"),), unit="Bps"),
        )),
    ),
)

DASHBOARDS = (OVERVIEW, ENGINES, SCHEDULER, TRAINING)


# --- rendering -------------------------------------------------------------------------------

def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    """One panel in Grafana's JSON model."""
    targets = [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": query.expr,
                "legendFormat": query.legend or "__auto", "range": True}
               for i, query in enumerate(panel.queries)]
    custom = {"stacking": {"mode": "normal" if panel.stack else "none"}, "fillOpacity": 20 if panel.stack else 0}
    out = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit, **({"custom": custom} if panel.kind == "timeseries" else {})},
                        "overrides": []},
    }
    if panel.kind == "timeseries":
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "colorMode": "value", "graphMode": "area"}
    return out


def _variable_json(var: Variable) -> dict:
    """A multi-value query variable with an ``All`` option that matches everything."""
    return {"name": var.name, "label": var.name, "type": "query", "datasource": DATASOURCE,
            "definition": var.query, "query": {"query": var.query, "refId": var.name},
            "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def render(dashboard: Dashboard) -> dict:
    """``dashboard`` in Grafana's JSON model: collapsible-free rows, panels wrapped at the grid width."""
    panels: list[dict] = []
    next_id, y = 1, 0
    for row_title, row_panels in dashboard.rows:
        panels.append({"id": next_id, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}})
        next_id, y = next_id + 1, y + 1
        x, line_height = 0, 0
        for panel in row_panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(_panel_json(panel, next_id, x, y))
            next_id, x, line_height = next_id + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    others = [{"title": d.title, "type": "link", "url": f"/d/{d.uid}", "icon": "dashboard"}
              for d in DASHBOARDS if d.uid != dashboard.uid]
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["cy-llm"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "links": others,
        "templating": {"list": [_variable_json(v) for v in dashboard.variables]},
        "annotations": {"list": []},
        "panels": panels,
    }


def rendered_files() -> dict[str, str]:
    """File name -> exact text of every dashboard file."""
    return {f"{d.uid.removeprefix('cy-llm-')}.json": json.dumps(render(d), indent=2) + "\n" for d in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    """Write the dashboards (or, with ``--check``, report the stale ones and exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed files are current")
    args = parser.parse_args(argv)
    stale = [name for name, text in rendered_files().items()
             if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_text() != text]
    if args.check:
        for name in stale:
            print(f"stale: {OUT_DIR / name} (run: python {__file__})", file=sys.stderr)
        return 1 if stale else 0
    OUT_DIR.mkdir(exist_ok=True)
    for name, text in rendered_files().items():
        (OUT_DIR / name).write_text(text)
    print(f"wrote {len(rendered_files())} dashboards to {OUT_DIR} ({len(stale)} changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
