"""The one-hop lookup: hash rings per role, the lookup interface (TCP 9500) and its client."""
