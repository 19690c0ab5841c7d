"""Transport: TLS connections between nodes and the framing of messages on them."""
