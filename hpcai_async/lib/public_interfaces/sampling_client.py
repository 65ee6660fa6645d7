"""``hpcai.lib.public_interfaces.sampling_client``: the official path of ``hpcai_async.SamplingClient``."""

from ...sampling import SamplingClient

__all__ = ("SamplingClient",)
