"""Protobuf and gRPC stubs generated from `protos/` by `python -m services.rpc.generate`."""
