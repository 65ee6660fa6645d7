"""``hpcai.lib.public_interfaces.rest_client``: the official path of ``hpcai_async.RestClient``."""

from ...rest import RestClient

__all__ = ("RestClient",)
