"""thor-dns: keeps the authoritative DNS of the network's domain equal to the live members."""
