"""What `/metrics` shows: the server's Prometheus series, kept and rendered by `prometheus_client`.

Each Server has its own registry (never the process-wide default), so several apps in one process, as in the
tests, count separately and never clash over a metric name. The Engine's prefix cache and its speculative decoding
count for themselves; their figures are read at each scrape.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Summary, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the text format generate_latest writes


class Metrics:
    def __init__(self, capacity: int, in_flight: Callable[[], int], running: Callable[[], int], prefix_cache=None,
                 speculation=None):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("openseek_requests_total", "HTTP requests by route and status code.",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("openseek_prompt_tokens_total", "Prompt tokens processed.", registry=registry)
        self.generation_tokens = Counter("openseek_generation_tokens_total", "Tokens generated.", registry=registry)
        self.reasoning_tokens = Counter("openseek_reasoning_tokens_total",
                                        "Generated tokens inside <think>...</think>.", registry=registry)
        self.requests_cancelled = Counter("openseek_requests_cancelled_total",
                                          "Requests whose client hung up before the whole answer; their generation "
                                          "stopped.", registry=registry)
        Gauge("openseek_sequences_in_flight", "Sequences generating or waiting for a batch slot.",
              registry=registry).set_function(in_flight)
        Gauge("openseek_sequences_capacity", "Sequences admitted at most before requests get 429.",
              registry=registry).set(capacity)
        Gauge("openseek_sequences_running", "Sequences holding a row of the engine's running batch.",
              registry=registry).set_function(running)
        self.time_to_first_token = Summary("openseek_time_to_first_token_seconds",
                                           "Time from request to first generated token.", registry=registry)
        self.request_seconds = Summary("openseek_request_seconds", "Time from request to last generated token.",
                                       registry=registry)
        if prefix_cache is not None:
            registry.register(_PrefixCacheFigures(prefix_cache))
        if speculation is not None:
            registry.register(_SpeculationFigures(speculation))

    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheFigures:
    """The Engine's prefix cache counters (openseek/engine/prefix.py) as Prometheus series."""

    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        c = self.cache
        yield CounterMetricFamily("openseek_prefix_cache_queried_tokens",
                                  "Prompt tokens looked up in the prefix cache.", value=c.queried_tokens)
        yield CounterMetricFamily("openseek_prefix_cache_hit_tokens",
                                  "Prompt tokens found in the prefix cache, so not prefilled again.",
                                  value=c.hit_tokens)
        yield GaugeMetricFamily("openseek_prefix_cache_hit_rate", "Hit tokens / queried tokens since the start.",
                                value=c.hit_tokens / c.queried_tokens if c.queried_tokens else 0.0)
        yield GaugeMetricFamily("openseek_prefix_cache_tokens", "Tokens the prefix cache holds now.", value=c.tokens)


class _SpeculationFigures:
    """The Engine's speculative-decoding counters (`engine.stats`) as Prometheus series."""

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        s = self.stats
        yield CounterMetricFamily("openseek_spec_decode_draft_tokens", "Draft tokens verified by the model.",
                                  value=s.drafted)
        yield CounterMetricFamily("openseek_spec_decode_accepted_tokens", "Draft tokens accepted.", value=s.accepted)
        yield GaugeMetricFamily("openseek_spec_decode_acceptance_rate", "Accepted / drafted since the start.",
                                value=s.acceptance_rate)
        yield GaugeMetricFamily("openseek_spec_decode_mean_accepted_length",
                                "Tokens a sequence gains per decode step (1 + accepted drafts).",
                                value=s.mean_accepted_length)
