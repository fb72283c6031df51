"""The error every core stage raises for unusable input data."""


class DataError(ValueError):
    """Input data is unusable; the message names the problem and the fix."""
