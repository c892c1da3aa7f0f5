"""retrv.runtime: the light half of retrv-edge. Imports numpy-level dependencies only, never torch."""

from retrv.runtime.errors import CheckpointError, InputError, MissingDependencyError, RetrvError

__all__ = ["RetrvError", "CheckpointError", "InputError", "MissingDependencyError"]
