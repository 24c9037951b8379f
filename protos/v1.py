"""The generated ckptd v1 modules under short names: ``pb`` (messages) and ``pb_grpc`` (stubs)."""

from .ckptd.v1 import ckptd_pb2 as pb
from .ckptd.v1 import ckptd_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
