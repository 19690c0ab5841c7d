"""What each NGNPro operation does: validate, commit to PostgreSQL, then tell the nodes.

The order is the contract: a change is committed before it is acknowledged,
and it is published (Thor.Provisioning) only after the commit. A node that
misses a publication (no event server reachable at that moment) still
converges: nodes reload what they own when they reconnect and every
[Node] account_reload_interval seconds.
"""

import hmac
import logging
import time

from thor.accounts.protocol import PROVISIONING, record_batches
from thor.ngnpro.model import (
    InvalidInputError,
    check_domain,
    check_email,
    check_password,
    check_sip_id,
    check_text,
    digests,
)

__all__ = ["Provisioning"]

log = logging.getLogger("thor.ngnpro")

MAX_LIST = 1000
MAX_OFFSET = 2**31 - 1


class Provisioning:
    def __init__(self, store, client, status_source, username, password, usage=None, relays=None):
        """status_source(): the current NetworkStatus; usage: node name -> (when, its latest Thor.Usage
        report); relays: the same of media relays' Thor.Statistics."""
        self.store = store
        self.client = client
        self.status_source = status_source
        self._username = username.encode()
        self._password = password.encode()
        self.usage = usage if usage is not None else {}
        self.relays = relays if relays is not None else {}
        self.unpublished = 0
        self.pushed = 0  # batches of committed changes pushed to the nodes

    def authenticate(self, username, password):
        # Both compared every time, in constant time: a wrong username takes as long as a wrong password.
        username_ok = hmac.compare_digest((username or "").encode(), self._username)
        password_ok = hmac.compare_digest((password or "").encode(), self._password)
        return username_ok and password_ok

    def _publish(self, changes):
        for batch in record_batches(changes):  # (deleting an account takes its aliases: maybe thousands)
            if self.client.publish(PROVISIONING, {"changes": batch}):
                self.pushed += 1
            else:
                # Committed but not pushed: the nodes' periodic reload brings it.
                self.unpublished += len(batch)
                log.warning("no event server: %d committed changes reach the nodes on their next reload", len(batch))

    # SipPort

    def add_domain(self, domain):
        self._publish(self.store.add_domain(check_domain(domain)))

    def delete_domain(self, domain):
        self._publish(self.store.delete_domain(check_domain(domain)))

    def domains(self):
        return self.store.domains()

    def add_account(self, fields):
        username, domain = check_sip_id(fields["username"], fields["domain"])
        ha1, ha1b = digests(username, domain, check_password(fields["password"]))
        record = {
            "username": username,
            "domain": domain,
            "ha1": ha1,
            "ha1b": ha1b,
            "first_name": check_text("firstName", fields["first_name"]),
            "last_name": check_text("lastName", fields["last_name"]),
            "email": check_email(fields["email"]),
            "enabled": True if fields["enabled"] is None else bool(fields["enabled"]),
        }
        self._publish(self.store.add_account(record))

    def update_account(self, fields):
        """Fields given (not None) change; the others keep their value."""
        username, domain = check_sip_id(fields["username"], fields["domain"])
        changes = {}
        for name, label in (("first_name", "firstName"), ("last_name", "lastName")):
            if fields[name] is not None:
                changes[name] = check_text(label, fields[name])
        if fields["email"] is not None:
            changes["email"] = check_email(fields["email"])
        if fields["enabled"] is not None:
            changes["enabled"] = bool(fields["enabled"])
        if fields["password"] is not None:
            changes["ha1"], changes["ha1b"] = digests(username, domain, check_password(fields["password"]))
        self._publish(self.store.update_account(username, domain, changes))

    def change_password(self, username, domain, password):
        username, domain = check_sip_id(username, domain)
        ha1, ha1b = digests(username, domain, check_password(password))
        self._publish(self.store.update_account(username, domain, {"ha1": ha1, "ha1b": ha1b}))

    def delete_account(self, username, domain):
        self._publish(self.store.delete_account(*check_sip_id(username, domain)))

    def account(self, username, domain):
        return self.store.account(*check_sip_id(username, domain))

    def accounts(self, domain, limit=None, offset=None):
        limit = MAX_LIST if limit is None else limit
        offset = 0 if offset is None else offset
        if not 1 <= limit <= MAX_LIST or not 0 <= offset <= MAX_OFFSET:
            raise InvalidInputError(f"limit: expected 1 to {MAX_LIST}; offset: expected 0 to {MAX_OFFSET}")
        return self.store.accounts(check_domain(domain), limit, offset)

    def add_alias(self, username, domain, target_username, target_domain):
        self._publish(
            self.store.add_alias(
                *check_sip_id(username, domain),
                *check_sip_id(target_username, target_domain, "target"),
            )
        )

    def delete_alias(self, username, domain):
        self._publish(self.store.delete_alias(*check_sip_id(username, domain)))

    def aliases(self, username, domain):
        return self.store.aliases(*check_sip_id(username, domain))

    # NetworkPort

    def network_status(self):
        status = self.status_source()
        return {
            "version": status.version,
            "manager": status.manager,
            "members": [status.members[name] for name in sorted(status.members)],
        }

    def statistics(self):
        """Per live member that reported in the last hour: its usage (nodes) and relay load (media relays)."""
        live = set(self.status_source().members)
        now = time.time()
        merged = {}
        for reports in (self.usage, self.relays):
            for name, (received, report) in reports.items():
                if name in live and now - received < 3600:
                    entry = merged.setdefault(name, {"updated": received})
                    entry.update(report)
                    entry["updated"] = max(entry["updated"], received)
        return [merged[name] for name in sorted(merged)]
