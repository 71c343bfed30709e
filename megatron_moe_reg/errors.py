"""The one exception type for bad user input, reported as a single line."""


class ConfigError(ValueError):
    """Invalid configuration. The message names the flag and the fix."""
