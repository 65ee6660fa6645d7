"""``hpcai.lib.public_interfaces.api_future``: the official path of ``hpcai_async.APIFuture``."""

from ..._futures import APIFuture

__all__ = ("APIFuture",)
