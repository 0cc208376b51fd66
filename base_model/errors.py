"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user: a config key, a path, a file. The message names the problem."""


class ConfigError(UserError):
    """A config that fails validation (unknown key, wrong type, inconsistent sizes)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match the model it is loaded into."""
