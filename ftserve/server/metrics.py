"""What GET /metrics reports, kept and rendered by ``prometheus_client``.

The maintained client library (the one vLLM uses) writes the text exposition format, escapes label values
and help text, and has a multiprocess mode for when the engine runs in a process of its own or the server
runs several workers; nothing here writes exposition text by hand. Each app gets its own
``CollectorRegistry``, so several apps in one process (as in the tests) keep separate counts.

Counters and histograms are updated by the request handlers as requests run. Everything else is read when
/metrics is scraped: the two request gauges from ``ServerMetrics``, the adapter count from the engine, and
``Engine.stats()`` through ``EngineStatsCollector``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine.base import Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# In the text format every counter and histogram would also get a `<name>_created` gauge family (its
# start time): a second series per label set that /metrics never had, and that scrapers, dashboards and the
# tests would see as new metric names. The switch is process-wide in the library.
disable_created_metrics()


class EngineStatsCollector(Collector):
    """``Engine.stats()`` at scrape time, each key as ``ftserve_engine_<key>``: a counter when the key ends
    in ``_total``, else a gauge."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self.engine.stats().items()):
            name = "ftserve_engine_" + "".join(c if c.isalnum() else "_" for c in key)
            family = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
            yield family(name, f"Engine statistic {key!r}.", value=float(value))


class ServerMetrics:
    """Everything GET /metrics reports, in ``registry``. ``model`` labels are the base model's served name or
    an adapter's; ``in_flight`` and ``waiting`` are plain integers that the request trackers move."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.in_flight = 0
        self.waiting = 0  # accepted, no token yet: queued in the engine or in prefill
        # The library appends `_total` to a counter's name; the names below are exposed with it.
        self.http_requests = Counter("ftserve_http_requests", "HTTP requests answered, by route and status.",
                                     ["route", "status"], registry=self.registry)
        self.errors = Counter("ftserve_request_errors", "Requests answered with an error status, by route and "
                                                        "status.", ["route", "status"], registry=self.registry)
        self.generation_requests = Counter("ftserve_generation_requests", "Completion and chat requests "
                                           "accepted, by model (base or adapter).", ["model"],
                                           registry=self.registry)
        self.prompt_tokens = Counter("ftserve_prompt_tokens", "Prompt tokens processed, by model.", ["model"],
                                     registry=self.registry)
        self.generation_tokens = Counter("ftserve_generation_tokens", "Tokens generated, by model.", ["model"],
                                         registry=self.registry)
        self.latency = Histogram("ftserve_request_latency_seconds", "Completion and chat latency, from request "
                                 "to last token, by route.", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.loads_on_first_use = Counter("ftserve_adapter_loads_on_first_use", "Adapter loads started because "
                                          "a request named an adapter folder not loaded "
                                          "(--enable-adapter-resolution), failed ones included.",
                                          registry=self.registry)
        self.ttft = Histogram("ftserve_time_to_first_token_seconds", "Time from request to the first generated "
                              "token, by route.", ["route"], buckets=TTFT_BUCKETS, registry=self.registry)
        Gauge("ftserve_requests_in_flight", "Completion and chat requests being served now.",
              registry=self.registry).set_function(lambda: self.in_flight)
        Gauge("ftserve_queue_depth", "Accepted completion and chat requests still waiting for their first token.",
              registry=self.registry).set_function(lambda: self.waiting)
        Gauge("ftserve_loaded_adapters", "Adapters loaded and servable by name.",
              registry=self.registry).set_function(lambda: len(engine.list_adapters()))
        self.registry.register(EngineStatsCollector(engine))
