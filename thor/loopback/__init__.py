"""A SIP Thor network on loopback, for the tests, the benchmarks and `make demo`.

process: programs as processes (configuration, ports, logs, waits); pki: a
throw-away CA; network: event servers, managers, nodes and the other members,
and observers of the network status; postgresql: PostgreSQL and PowerDNS;
kamailio: the SIP proxy and a SIP client. Everything listens on loopback
addresses and every process ends with its caller.
"""
