"""``hpcai.lib.public_interfaces.service_client``: the official path of ``hpcai_async.ServiceClient``."""

from ...service import ServiceClient

__all__ = ("ServiceClient",)
