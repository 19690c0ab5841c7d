"""SIP over the overlay: what thor-node does for the SIP proxy beside it (docs/sip.md).

digest: checking a digest response with the HA1 a home node holds; location:
the bindings of a subscriber, read from the local Kamailio; peers: the
node-to-node API (mutual TLS) through which an edge node consults a home
node; api: the loopback HTTP interface the SIP proxy asks.
"""
