"""``hpcai.lib.public_interfaces`` of the official SDK: the client classes and APIFuture, re-exported.

Only the import path is the official one; the classes are hpcai_async's own (``hpcai_async.ServiceClient``
and so on). Its submodules (``.service_client``, ``.training_client``, ``.sampling_client``,
``.rest_client``, ``.api_future``) exist too. The official ``AwaitableConcurrentFuture`` (a wrapper of a
``concurrent.futures.Future``) has no counterpart: every future here is an ``APIFuture``.
"""

from ...rest import RestClient
from ...sampling import SamplingClient
from ...service import ServiceClient
from ...training import TrainingClient
from .api_future import APIFuture

__all__ = ("APIFuture", "RestClient", "SamplingClient", "ServiceClient", "TrainingClient")
