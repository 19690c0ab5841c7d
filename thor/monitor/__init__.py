"""thor-monitor: the network in a terminal."""
