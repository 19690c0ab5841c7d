"""thor-eventserver: the TLS publish/subscribe bus of the overlay."""
