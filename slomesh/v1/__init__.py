"""Generated protobuf and gRPC code for slomesh.v1 (scripts/gen_protos.py)."""
