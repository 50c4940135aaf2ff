"""Generated protobuf and gRPC code for the devpass.v1 API; `make protos` rewrites it."""
