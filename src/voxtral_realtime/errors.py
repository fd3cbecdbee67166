"""User-facing errors.

Every problem a user can cause (a bad option, a bad path, an unreadable file, a checkpoint that does not match
its params.json, no network) is raised as a :class:`VoxtralError` subclass with a one-line message.  The CLI
prints that line and exits non-zero; anything else is a bug: it keeps its traceback and says so.
"""


class VoxtralError(Exception):
    """Base class of the errors a user can fix; ``str(err)`` is a complete one-line explanation."""


class UsageError(VoxtralError, ValueError):
    """An option or argument the model or command does not accept (a delay, dtype, quantization type, size).

    Also a ValueError, which these mistakes raised before they had a class of their own."""


class AudioError(VoxtralError):
    """An audio input could not be read or decoded."""


class CheckpointError(VoxtralError):
    """A model folder, file or Hub repo is missing, incomplete, corrupt or inconsistent."""


class DownloadError(VoxtralError):
    """A model could not be fetched from the Hugging Face Hub (network, auth, offline mode)."""


def first_line(exc: BaseException) -> str:
    """The first line of an underlying library's message, to quote inside one of ours."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
