"""The errors core stages raise for unusable input (torch-free, so the CLI can catch them
without importing torch)."""


class DataError(ValueError):
    """Input data is unusable; the message names the problem and the fix."""


class CheckpointError(ValueError):
    """A weights file cannot be used; the message says why and what to do."""
