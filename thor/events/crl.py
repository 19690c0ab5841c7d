"""Every member keeps the network's newest CRL, without an operator copying it around.

The event servers hand their CRL to each subscriber of Thor.CRL and take a
member's offer when it supersedes theirs (thor.eventserver.server). A member
takes what supersedes its own (TLSContexts.offer_crl keeps it in
[TLS] learned_crl and reloads: revoked peers are dropped at once) and offers
its own to the servers whenever a server hands it an older one, or when its
own changes (a new file from the CA, or one learned through another server).
So a CRL put on any one host, or offered by `thor-pki publish-crl`, reaches
every connected member within a few round trips; see docs/pki.md.
"""

import logging

from thor.events import topics
from thor.transport.crl import CRLError, RevocationList
from thor.transport.framing import FrameError

__all__ = ["CRLExchange"]

log = logging.getLogger("thor.crl")


class CRLExchange:
    """Follows Thor.CRL for client (an EventClient) on behalf of contexts (its TLSContexts)."""

    def __init__(self, client, contexts):
        self.client = client
        self.contexts = contexts
        self._offered = contexts.revocation_list.pem
        client.subscribe(topics.CRL, self._received, deduplicate=False)
        contexts.add_reload_callback(self._reloaded)

    def _received(self, message):
        body = message.body
        if not isinstance(body, dict) or not isinstance(body.get("crl"), str):
            log.warning("ignoring a Thor.CRL message from %s: not a CRL", message.server)
            return
        held = self.contexts.revocation_list
        if held.is_text(body["crl"]):
            return
        try:
            handed = RevocationList(body["crl"], self.contexts.ca_certificates)
        except CRLError as error:
            log.warning("ignoring the CRL event server %s handed over: it %s", message.server, error)
            return
        if handed.supersedes(held):
            if self.contexts.offer_crl(body["crl"]):
                log.info("took %s from event server %s", handed, message.server)
        elif held.supersedes(handed):
            self._offer(f"event server {message.server} holds the older {handed}")

    def _reloaded(self, contexts):
        if contexts.revocation_list.pem != self._offered:
            self._offer("it changed here")

    def _offer(self, why):
        held = self.contexts.revocation_list
        self._offered = held.pem
        log.info("offering %s to the event servers: %s", held, why)
        try:
            self.client.publish(topics.CRL, {"crl": held.pem.decode("ascii", "replace")})
        except FrameError as error:
            log.error("cannot offer %s: %s", held, error)
