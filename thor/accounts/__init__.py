"""Subscribers' accounts between NGNPro and the sip_proxy nodes (docs/provisioning.md).

protocol: the topics, who may use them, and the messages; cache: a node's
side, the accounts it is responsible for; loads: NGNPro's side, answering a
node's request for its accounts.
"""
