"""``hpcai.lib.public_interfaces.training_client``: the official path of ``hpcai_async.TrainingClient``."""

from ...training import TrainingClient

__all__ = ("TrainingClient",)
