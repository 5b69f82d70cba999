"""Short names for the generated relay.v1 modules (`pb` messages, `pb_grpc` stubs and servicers).

The generated code lives under relay/protos/ and is produced by relay/protos/generate.py only.
"""
from relay.protos.familial.relay.v1 import relay_pb2 as pb  # noqa: F401
from relay.protos.familial.relay.v1 import relay_pb2_grpc as pb_grpc  # noqa: F401

SERVICE_NAME = "familial.relay.v1.Relay"
