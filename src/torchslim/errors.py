"""Every user-facing failure in torchslim is one of these errors.

Each message names what was wrong (the key, the layer, the file, the offset) and says what
to do about it. Catch :class:`TorchslimError` to catch them all.
"""

from __future__ import annotations


class TorchslimError(Exception):
    """Base class of every error torchslim raises on purpose."""


class ConfigError(TorchslimError, ValueError):
    """A config, plan or argument value is out of range or of the wrong kind."""


class DataError(TorchslimError):
    """A dataset is missing, unreadable or not what the model expects."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A built-in dataset's files are not on this machine."""


class ArtifactError(TorchslimError):
    """A `.tslim` file is not readable: not safetensors, truncated, corrupted or foreign."""


class ShapeMismatchError(ArtifactError):
    """The model given to `load` does not have the shapes stored in the file."""


class RecipeError(TorchslimError, ValueError):
    """A recipe file has unknown keys, wrong types or missing values."""


class ReportError(TorchslimError, ValueError):
    """A report file is of another schema version, or not a report of this kind."""


class WeightsError(TorchslimError, ValueError):
    """A weights file is of a refused kind, unreadable, or does not fit the model it is for."""


class OutputError(TorchslimError, OSError):
    """An output file cannot be written where asked: an empty path, a folder, a path under a
    file, no permission, or a full disk. Any earlier file at the path is left as it was."""


class TrainingError(TorchslimError, RuntimeError):
    """A training process failed (one of several under torchrun); a rerun resumes from its checkpoints."""


class UpdateRejectedError(TorchslimError, ValueError):
    """A federated server refused a client's model update: undecodable bytes, tensors of other
    names or shapes than the global model's, NaN or Inf values, or a payload over the size
    limit. The update is dropped and the global model is left as it was."""
