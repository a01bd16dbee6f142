"""The only errors users see. The CLI prints one line for an EdgeTLError and exits 2."""


class EdgeTLError(Exception):
    """Root of every error edge-tl raises on purpose: bad input, missing artifact, missing backend."""

    exit_code = 2


class ConfigError(EdgeTLError):
    """A setting or argument is invalid (unknown backbone, bad image size, bad option value)."""


class DatasetError(EdgeTLError):
    """The image folder cannot be used (missing, empty, one class, too few or unreadable images)."""


class ArtifactError(EdgeTLError):
    """A run directory or artifact is missing, incomplete, mismatched or would be overwritten."""


class BackendUnavailableError(EdgeTLError):
    """An optional backend (TensorRT, pycuda, a GPU, pretrained weights on disk) is not present."""


class AccuracyRegressionError(EdgeTLError):
    """A verified artifact fell below the accuracy gate."""

    exit_code = 1


class InconclusiveVerificationError(EdgeTLError):
    """A verified artifact could be shown neither as good as the float model nor worse (too few images)."""

    exit_code = 3


class RunLockedError(EdgeTLError):
    """Another live process holds the run directory's lock (a second writing command on the same run)."""


class TrialsFailedError(EdgeTLError):
    """Some trials of a sweep failed (each row names its error); the others ran and the table was written."""

    exit_code = 1
