"""thor-database: publishes where the provisioning database is."""
