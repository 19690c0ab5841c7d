"""NGNPro: SOAP/XML provisioning, stored in PostgreSQL and pushed to the responsible nodes."""
