"""Prometheus metrics of one server (their own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("tah_requests", "Requests by endpoint and outcome (ok, error, rejected, cancelled)",
                                ["endpoint", "outcome"], registry=registry)
        self.prompt_tokens = Counter("tah_prompt_tokens", "Prompt tokens prefilled", registry=registry)
        self.generated_tokens = Counter("tah_generated_tokens", "Tokens generated", registry=registry)
        self.iterated_tokens = Counter("tah_iterated_tokens", "Generated tokens that took more than one pass",
                                       registry=registry)
        self.iterated_share = Gauge("tah_iterated_share", "Share of generated tokens that iterated (since start)",
                                    registry=registry)
        self.running = Gauge("tah_running_requests", "Requests in the running batch", registry=registry)
        self.waiting = Gauge("tah_waiting_requests", "Requests queued for a place in the batch", registry=registry)
        self.ttft = Histogram("tah_time_to_first_token_seconds", "From arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=registry)
        self.step_seconds = Histogram("tah_step_seconds", "One decode step of the running batch",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self._generated = self._iterated = 0

    def count_tokens(self, passes: list[int]) -> None:
        """Count newly generated tokens, given each one's passes."""
        iterated = sum(p > 1 for p in passes)
        self.generated_tokens.inc(len(passes))
        self.iterated_tokens.inc(iterated)
        self._generated += len(passes)
        self._iterated += iterated
        if self._generated:
            self.iterated_share.set(self._iterated / self._generated)

    def render(self) -> bytes:
        return generate_latest(self.registry)
