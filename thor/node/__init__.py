"""thor-node: joins a host's roles to the overlay and health-checks their local services."""
