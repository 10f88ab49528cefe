"""The one error type the engine raises for bad input: it names the thing and the fix."""
from __future__ import annotations


class StudioError(Exception):
    """A user-facing error.

    ``field`` names the request field or setting at fault, ``path`` the file, ``fix`` what the user can do.
    The message is complete on its own so UI, API and logs can show ``str(err)`` unchanged.
    """

    def __init__(self, message: str, *, field: str | None = None, path: str | None = None,
                 fix: str | None = None, status: int = 422):
        self.field = field
        self.path = path
        self.fix = fix
        self.status = status
        text = message
        if fix:
            text = f"{message} Fix: {fix}"
        super().__init__(text)

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "detail": str(self), "field": self.field, "path": self.path}


class ModelLoadError(StudioError):
    """A model file could not be read or understood."""


class JobInterrupted(Exception):
    """Raised inside a job when the user interrupts it (not an error for the caller)."""
