"""thor-manager: turns presence into the network status; one of several is active."""
