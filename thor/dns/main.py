"""thor-dns: the daemon."""

from gevent import monkey

monkey.patch_all()

import collections
import sys
import time

import gevent
from gevent.event import Event

from thor import roles
from thor.config import ThorNetworkConfig, TLSConfig
from thor.daemon import StartupError, run
from thor.dns.config import DNSConfig
from thor.dns.embedded import EmbeddedZone
from thor.dns.powerdns import PowerDNSZone
from thor.dns.records import ZoneSettings, zone_records
from thor.membership.program import MemberDaemon
from thor.metrics import Histogram, counter, gauge, histogram
from thor.pgsql import make_dsn

ROLE = roles.DNS_MANAGER
UPDATE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DNSDaemon(MemberDaemon):
    program = "thor-dns"
    description = "Keeps the authoritative DNS of the SIP Thor domain equal to the live network members."
    sections = (ThorNetworkConfig, TLSConfig, DNSConfig)
    required_role = ROLE

    def setup(self):
        config = self.config[DNSConfig]
        network = self.config[ThorNetworkConfig]
        nameservers = config.nameservers or [(self.identity.name, self.member.address)]
        self.zone_settings = ZoneSettings(
            network.domain, nameservers, config.ttl, config.answer_limit, config.hostmaster or None
        )
        if config.backend == "embedded":
            self.backend = EmbeddedZone(config.listen)
            try:
                self.backend.start()
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {config.listen[0]}:{config.listen[1]}: {error.strerror}"
                ) from None
            self.log.info("answering DNS for %s on %s:%d", network.domain, *self.backend.address[:2])
        else:
            dsn = make_dsn(
                host=config.database_host,
                port=config.database_port,
                dbname=config.database_name,
                user=config.database_user,
                password=config.database_password,
                sslmode=config.database_sslmode,
                sslrootcert=config.database_sslrootcert or self.config[TLSConfig].ca,
            )
            self.backend = PowerDNSZone(dsn, config.powerdns_schema)
        self.applied = None
        self.serial = 0
        self.updates = 0
        self.backend_errors = 0
        self.update_seconds = Histogram(UPDATE_BUCKETS)  # from a status change to the zone holding it
        self._changed_at = None  # when the status changed that is not applied yet
        self._wanted = Event()
        self.member.status.on_change(self._status_changed)
        self._worker = gevent.spawn(self._work)

    def _status_changed(self, old, new):
        if self._changed_at is None:
            self._changed_at = time.monotonic()
        self._wanted.set()

    def metric_families(self):
        yield from super().metric_families()
        counts = collections.Counter()
        for rrset in (self.applied or {}).values():
            counts[rrset.rdtype] += len(rrset.rdatas)
        yield gauge(
            "thor_dns_records",
            "Records in the zone, by type.",
            labels=["type"],
            samples=[([rdtype], count) for rdtype, count in sorted(counts.items())],
        )
        yield counter("thor_dns_updates", "Network statuses applied to the zone.", self.updates)
        yield histogram(
            "thor_dns_update_seconds",
            "From a network status change to the zone holding it.",
            samples=[((), self.update_seconds)],
        )
        yield counter(
            "thor_dns_backend_errors", "Updates the backend refused or could not take (retried).", self.backend_errors
        )

    def teardown(self):
        self._worker.kill()
        if self.config[DNSConfig].backend == "embedded":
            self.backend.stop()
        else:
            self.backend.close()

    def _work(self):
        """Apply the latest status; what cannot be applied now is retried, never half-applied."""
        retry = self.config[DNSConfig].retry_interval
        while True:
            self._wanted.wait()
            self._wanted.clear()
            status = self.member.status.status
            records = zone_records(status, self.zone_settings)
            if records == self.applied:
                self._changed_at = None
                continue
            try:
                self._apply(records, status)
            except Exception as error:
                self.backend_errors += 1
                self.log.error(
                    "cannot apply network status v%d to DNS (retrying in %gs): %s", status.version, retry, error
                )
                gevent.sleep(retry)
                self._wanted.set()
                continue
            self.applied = records
            self.updates += 1
            if self._changed_at is not None:
                self.update_seconds.observe(time.monotonic() - self._changed_at)
                self._changed_at = None

    def _apply(self, records, status):
        if self.config[DNSConfig].backend == "embedded":
            self.serial = max(self.serial + 1, int(time.time()))
            self.backend.update(self.zone_settings, records, self.serial)
            self.log.info("zone %s serial %d from status v%d", self.zone_settings.domain, self.serial, status.version)
        else:
            deleted, inserted, serial = self.backend.apply(self.zone_settings, records)
            self.log.info(
                "zone %s serial %d from status v%d (%d rows deleted, %d inserted)",
                self.zone_settings.domain,
                serial,
                status.version,
                deleted,
                inserted,
            )


def main(argv=None):
    return run(DNSDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
