"""Scraping /metrics over HTTP and reading samples, as Prometheus would."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape: every sample by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


def scrape_sync(port: int, host: str = "127.0.0.1", accept: str | None = None) -> str:
    request = urllib.request.Request(f"http://{host}:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())


async def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    return Scrape(await asyncio.to_thread(scrape_sync, port, host))


def call_labels(service: str, method: str, grpc_type: str = "unary") -> dict[str, str]:
    return {"grpc_service": service, "grpc_method": method, "grpc_type": grpc_type}
