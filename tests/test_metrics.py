"""/metrics: label values from fixed sets only, and rendering off the event loop."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator

import anyio.to_thread
import httpx
import respx
from fastapi import FastAPI
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from pinauth.pinterest.endpoints import RESOURCES
from pinauth.settings import Settings
from tests.helpers import connect_account, metrics_of


def _label_values(text: str, metric: str, label: str) -> set[str]:
    return set(re.findall(rf'^{metric}\{{[^}}]*{label}="([^"]*)"', text, re.MULTILINE))


async def test_upstream_series_stay_bounded_whatever_paths_clients_send(
    client: httpx.AsyncClient, pinterest: respx.MockRouter, settings: Settings
) -> None:
    """Guards the upstream latency label: 2,000 calls to distinct unknown first path
    segments add one series (`other`), not 2,000; known resources keep their name."""
    await connect_account(client, pinterest, settings)
    pinterest.route().respond(200, json={})

    for i in range(2000):
        response = await client.get(f"/pinterest/made-up-{i}/x")
        assert response.status_code == 200
    await client.get("/pinterest/boards")

    text = (await client.get("/metrics")).text
    endpoints = _label_values(text, "pinauth_upstream_request_duration_seconds_count", "endpoint")
    assert endpoints == {"other", "boards", "oauth"}
    assert endpoints <= RESOURCES | {"other"}
    assert 'endpoint="other"} 2000.0' in text
    routes = _label_values(text, "pinauth_http_requests_total", "route")
    assert routes <= {"/pinterest/{path}", "/auth/login", "/auth/callback", "/metrics"}


async def test_unknown_methods_are_counted_as_other(client: httpx.AsyncClient) -> None:
    """Guards the method label: any token is a valid HTTP method, so methods outside the
    known set are all counted under `other` instead of each minting a series."""
    for i in range(50):
        await client.request(f"FOOBAR{i}", "/healthz")
        await client.request(f"X{i}", "/pinterest/boards")
    await client.get("/healthz")

    text = (await client.get("/metrics")).text
    methods = _label_values(text, "pinauth_http_requests_total", "method")
    assert methods == {"GET", "other"}, methods


class _BlockingProbe(Collector):
    """A collector that notes which thread renders it and holds that thread until released."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def describe(self) -> list[Metric]:
        return []  # keeps register() from calling collect()

    def collect(self) -> Iterator[Metric]:
        self.threads.append(threading.current_thread())
        self.entered.set()
        self.release.wait(timeout=5)
        return iter(())


async def test_metrics_render_off_the_event_loop(app: FastAPI, client: httpx.AsyncClient) -> None:
    """Guards that a scrape never blocks the event loop: while /metrics is being
    rendered (held inside a collector), /healthz is answered, and the rendering ran in
    a thread other than the loop's."""
    probe = _BlockingProbe()
    metrics_of(app).registry.register(probe)
    scrape = asyncio.create_task(client.get("/metrics"))
    assert await anyio.to_thread.run_sync(probe.entered.wait, 5)

    health = await asyncio.wait_for(client.get("/healthz"), 5)

    assert health.status_code == 200
    assert not scrape.done()  # /healthz was answered while the scrape was held
    probe.release.set()
    assert (await scrape).status_code == 200
    assert probe.threads
    assert threading.current_thread() not in probe.threads
