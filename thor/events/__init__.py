"""Events: the publish/subscribe protocol, its authorization rules and the member client."""
