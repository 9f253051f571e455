"""Errors that the CLI and the plugin show to users as they are (no traceback)."""


class HRMedSegError(Exception):
    """Base of every error whose message is meant for the user."""


class WeightsError(HRMedSegError, RuntimeError):
    """A weights file is missing, unreadable, or holds something other than expected."""


class InputError(HRMedSegError, ValueError):
    """An image, a box or an annotation given by the user cannot be used; the message names it."""


class OutputError(HRMedSegError, OSError):
    """An output cannot be written (full disk, read-only or forbidden folder); the message names it."""
