"""Membership: entities, the network status, and the member every program builds on."""
