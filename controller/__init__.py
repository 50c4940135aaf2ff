"""devpass controller: the fleet registry and its gRPC API."""
