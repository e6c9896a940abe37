"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters and histograms are updated on the event loop, so they need no locks. Gauges that belong to the
engine (queue depth, running requests, ...) are read from ``Engine.stats()`` when /metrics is scraped.
"""

from __future__ import annotations

import math
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = labels + extra
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = name, help
        self.values: dict[Labels, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self.values[tuple(sorted(labels.items()))] += amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.series: dict[Labels, list] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        counts, total = self.series.setdefault(key, [[0] * len(self.buckets), [0.0, 0]])
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
        total[0] += value
        total[1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, (total, count)) in sorted(self.series.items()):
            for bound, n in zip(self.buckets, counts):
                lines.append(f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {n}")
            lines.append(f"{self.name}_bucket{_labels(key, (('le', '+Inf'),))} {count}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            lines.append(f"{self.name}_count{_labels(key)} {count}")
        return lines


def _gauge(name: str, help: str, values: dict[Labels, float]) -> list[str]:
    lines = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    return lines + [f"{name}{_labels(k)} {_number(v)}" for k, v in sorted(values.items())]


class ServerMetrics:
    """Everything GET /metrics reports. ``model`` labels are the base model's served name or an adapter's."""

    def __init__(self) -> None:
        self.http_requests = Counter("ftserve_http_requests_total", "HTTP requests answered, by route and status.")
        self.errors = Counter("ftserve_request_errors_total", "Requests answered with an error status, by route "
                                                              "and status.")
        self.generation_requests = Counter("ftserve_generation_requests_total",
                                           "Completion and chat requests accepted, by model (base or adapter).")
        self.prompt_tokens = Counter("ftserve_prompt_tokens_total", "Prompt tokens processed, by model.")
        self.generation_tokens = Counter("ftserve_generation_tokens_total", "Tokens generated, by model.")
        self.latency = Histogram("ftserve_request_latency_seconds",
                                 "Completion and chat latency, from request to last token, by route.",
                                 LATENCY_BUCKETS)
        self.ttft = Histogram("ftserve_time_to_first_token_seconds",
                              "Time from request to the first generated token, by route.", TTFT_BUCKETS)
        self.in_flight = 0
        self.waiting = 0  # accepted, no token yet: queued in the engine or in prefill

    def render(self, loaded_adapters: int, engine_stats: dict[str, float]) -> str:
        lines: list[str] = []
        for metric in (self.http_requests, self.errors, self.generation_requests, self.prompt_tokens,
                       self.generation_tokens, self.latency, self.ttft):
            lines += metric.render()
        lines += _gauge("ftserve_requests_in_flight", "Completion and chat requests being served now.",
                        {(): self.in_flight})
        lines += _gauge("ftserve_queue_depth", "Accepted completion and chat requests still waiting for their "
                                               "first token.", {(): self.waiting})
        lines += _gauge("ftserve_loaded_adapters", "Adapters loaded and servable by name.", {(): loaded_adapters})
        for key, value in sorted(engine_stats.items()):
            name = "ftserve_engine_" + "".join(c if c.isalnum() else "_" for c in key)
            kind = "counter" if name.endswith("_total") else "gauge"
            lines += [f"# HELP {name} Engine statistic {key!r}.", f"# TYPE {name} {kind}",
                      f"{name} {_number(float(value))}"]
        return "\n".join(lines) + "\n"
