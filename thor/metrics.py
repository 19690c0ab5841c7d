"""Prometheus metrics of a Thor program, served over HTTP on [Metrics] <program> (docs/metrics.md).

Nothing is counted through prometheus_client on the hot paths: the programs
keep plain counters on their objects, and a scrape turns them into metric
families (Daemon.metric_families). The server is a gevent WSGI server in the
program's own loop; a scrape takes a few milliseconds. Addresses outside
loopback and [Metrics] allow get 403 before anything is read, so that a metrics
port opened on a host address shows nothing to anyone else and costs them nothing.
"""

import contextlib
import ipaddress
import logging
from datetime import UTC, datetime

from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from thor.config import Section, Setting
from thor.datatypes import Endpoint, NetworkList

__all__ = [
    "DEFAULT_PORTS",
    "Histogram",
    "MetricsConfig",
    "MetricsServer",
    "counter",
    "gauge",
    "histogram",
    "tls_expiry_families",
]

log = logging.getLogger("thor.metrics")

# Scrapes served at once (Prometheus asks once per interval), and how long one may take.
MAX_SCRAPES = 8
SCRAPE_TIMEOUT = 10.0
FORBIDDEN = (
    b"HTTP/1.0 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n"
    b"not an allowed scraper ([Metrics] allow)\n"
)
# One port per program, so that every program of a host can be scraped.
DEFAULT_PORTS = {"eventserver": 9811, "manager": 9812, "node": 9813, "database": 9814, "dns": 9815, "ngnpro": 9816}


def _listen_setting(program):
    port = DEFAULT_PORTS[program]
    return Setting(
        Endpoint(port, allow_empty=True),
        f"127.0.0.1:{port}",
        f"Where {'ngnpro' if program == 'ngnpro' else 'thor-' + program} serves /metrics (HTTP); empty: not at all.",
    )


class MetricsConfig(Section):
    name = "Metrics"
    eventserver = _listen_setting("eventserver")
    manager = _listen_setting("manager")
    node = _listen_setting("node")
    database = _listen_setting("database")
    dns = _listen_setting("dns")
    ngnpro = _listen_setting("ngnpro")
    allow = Setting(
        NetworkList(),
        "",
        "Addresses or networks that may scrape besides loopback (the Prometheus server); others get 403.",
    )

    def listen_of(self, program):
        """The (host, port) program ('thor-node', 'ngnpro', ...) serves metrics on, or None: turned
        off, or a program without a key here (thor-monitor, a tool run by hand, serves none)."""
        key = program.removeprefix("thor-")
        return getattr(self, key) if key in DEFAULT_PORTS else None


class MetricsServer:
    """/metrics of one program: its own families (collect() -> iterable of metric families) and
    the process, platform and garbage collector metrics of prometheus_client."""

    def __init__(self, listen, collect, allow=()):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(collect))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.allow = tuple(allow)
        self._metrics = make_wsgi_app(self.registry)
        self.server = _ScrapeServer(
            listen, self._application, allowed=self._allowed, spawn=Pool(MAX_SCRAPES), log=None, error_log=log
        )

    @property
    def address(self):
        return self.server.address

    def bind(self):
        """Take the port (OSError when it cannot), before the program starts."""
        self.server.init_socket()

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop(timeout=1)

    def _application(self, environ, start_response):
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"see /metrics\n"]
        return self._metrics(environ, start_response)

    def _allowed(self, address):
        try:
            source = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if source.is_loopback or (source.version == 6 and source.ipv4_mapped and source.ipv4_mapped.is_loopback):
            return True
        mapped = source.ipv4_mapped if source.version == 6 and source.ipv4_mapped else source
        return any(mapped in network for network in self.allow if network.version == mapped.version)


class _ScrapeServer(WSGIServer):
    """Answers a source that may not scrape with 403 at once, without reading its request, and
    gives each scrape SCRAPE_TIMEOUT: strangers hold no connection and no greenlet."""

    def __init__(self, *args, allowed, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowed = allowed

    def handle(self, sock, address):
        if not self._allowed(address[0] if address else ""):
            with contextlib.suppress(OSError):
                sock.sendall(FORBIDDEN)
            sock.close()
            return
        sock.settimeout(SCRAPE_TIMEOUT)
        super().handle(sock, address)


class _Collector:
    def __init__(self, collect):
        self._collect = collect

    def collect(self):
        try:
            yield from self._collect()
        except Exception:
            # A bug in one family must not take the scrape (and the process metrics) with it.
            log.exception("collecting metrics failed")


def gauge(name, documentation, value=None, labels=None, samples=()):
    """A gauge family: one value, or samples [(label values, value)] with label names labels."""
    family = GaugeMetricFamily(name, documentation, value=value, labels=labels)
    for label_values, sample in samples:
        family.add_metric(label_values, sample)
    return family


def counter(name, documentation, value=None, labels=None, samples=()):
    """A counter family (name without _total): one value, or samples as for gauge()."""
    family = CounterMetricFamily(name, documentation, value=value, labels=labels)
    for label_values, sample in samples:
        family.add_metric(label_values, sample)
    return family


class Histogram:
    """Observations counted in fixed buckets (seconds), cheap enough for every request."""

    __slots__ = ("bounds", "counts", "sum", "total")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0
        self.sum = 0.0

    def observe(self, value):
        index = 0
        for index, bound in enumerate(self.bounds):  # noqa: B007 (the index is the bucket)
            if value <= bound:
                break
        else:
            index = len(self.bounds)
        self.counts[index] += 1
        self.total += 1
        self.sum += value

    def buckets(self):
        cumulative, result = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            result.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        return result


def histogram(name, documentation, labels=(), samples=()):
    """A histogram family from samples [(label values, Histogram)]."""
    family = HistogramMetricFamily(name, documentation, labels=list(labels))
    for label_values, observed in samples:
        family.add_metric(list(label_values), observed.buckets(), observed.sum)
    return family


def tls_expiry_families(contexts, now=None):
    """Seconds until this program's certificate, the CA (the first to expire) and the CRL expire."""
    now = now or datetime.now(UTC)
    ca = min(
        (end for what, end, _ in contexts.expiries() if what.startswith("the CA ") and end is not None), default=None
    )
    ends = {"certificate": contexts.certificate_expiry, "ca": ca, "crl": contexts.revocation_list.next_update}
    return [
        gauge(
            "thor_tls_expiry_seconds",
            "Seconds until the file expires (negative: expired): certificate, ca or crl.",
            labels=["file"],
            samples=[([what], (end - now).total_seconds()) for what, end in ends.items() if end is not None],
        )
    ]
