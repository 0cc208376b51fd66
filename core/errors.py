"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""

import errno
import os


class UserError(Exception):
    """Bad input from the user: a config key, a path, a file. The message names the problem."""


class ConfigError(UserError):
    """A config that fails validation (unknown key, wrong type, inconsistent sizes)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or does not match the model it is loaded into."""


def check_state_dict(where: object, state: dict, expected: dict) -> None:
    """Missing, unexpected or mis-shaped keys of `state` vs `expected` (name -> tensor) -> one CheckpointError."""
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise CheckpointError(f"{where}: {len(missing)} missing keys: {shown}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (", ..." if len(unexpected) > 3 else "")
        raise CheckpointError(f"{where}: {len(unexpected)} unexpected keys: {shown}")
    for key, want in expected.items():
        if state[key].shape != want.shape:
            raise CheckpointError(
                f"{where}: shape mismatch for {key}: expected {tuple(want.shape)}, found {tuple(state[key].shape)}"
            )


# Write failures the user fixes by freeing space, raising a quota or pointing output elsewhere.
_USER_WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM"}


def write_error(path: object, error: OSError) -> UserError | None:
    """A one-line UserError naming `path` for a disk-full / quota / read-only / permission OSError; None
    for any other OSError (a bug or a hardware fault: let it surface with its traceback)."""
    if errno.errorcode.get(error.errno) not in _USER_WRITE_ERRNOS:
        return None
    return UserError(f"{path}: cannot write ({os.strerror(error.errno)})")
