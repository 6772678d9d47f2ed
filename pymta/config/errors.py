"""The one error type configuration problems become: the CLI prints it as one line, exit 2."""


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the variable and what is wrong,
    e.g. ``MESSAGE_SIZE_LIMIT: not a whole number: 'ten'``."""
