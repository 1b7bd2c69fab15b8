"""User-facing errors and the exit codes of the BIDS-Apps execution spec.

Every module raises one of these (never ``sys.exit``); the command line turns them into a
one-paragraph message and the exit code, without a traceback.

>>> err = InputDataError("image has NaN voxels", path="sub-01_T1w.nii.gz")
>>> int(err.exit_code)
65
>>> str(err)
'sub-01_T1w.nii.gz: image has NaN voxels'
"""
from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Exit codes (see DESIGN.md and the BIDS-Apps spec; 64-75 follow sysexits.h)."""

    OK = 0
    UNSPECIFIED = 1
    VALIDATION_FAILED = 16
    UNKNOWN_LEVEL = 17
    NO_FILES = 18
    USAGE = 64
    DATA_ERROR = 65
    NO_INPUT = 66
    CANNOT_CREATE = 73
    IO_ERROR = 74
    TEMPORARY = 75


class CLBidsAppError(Exception):
    """Base class: a failure explained to the user, with an exit code."""

    exit_code: int = ExitCode.UNSPECIFIED

    def __init__(self, message: str, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text

    def __reduce__(self):  # keep pickling (Nipype, multiprocessing) lossless
        return (self.__class__, (self.message, self.path, self.hint))


class ValidationFailed(CLBidsAppError):
    exit_code = ExitCode.VALIDATION_FAILED


class UnknownLevel(CLBidsAppError):
    exit_code = ExitCode.UNKNOWN_LEVEL


class NoFilesSelected(CLBidsAppError):
    exit_code = ExitCode.NO_FILES


class UsageError(CLBidsAppError):
    exit_code = ExitCode.USAGE


class InputDataError(CLBidsAppError):
    """The input exists but its content is unusable (exit 65)."""

    exit_code = ExitCode.DATA_ERROR


class MissingInputError(CLBidsAppError):
    """A required file (image, model, template) is absent (exit 66)."""

    exit_code = ExitCode.NO_INPUT


class OutputError(CLBidsAppError):
    """The output or work folder cannot be created or written (exit 73)."""

    exit_code = ExitCode.CANNOT_CREATE


class IOFailure(CLBidsAppError):
    """Reading or writing failed mid-way (disk full, I/O error; exit 74)."""

    exit_code = ExitCode.IO_ERROR


class TemporaryFailure(CLBidsAppError):
    """Try again later: out of memory, GPU busy (exit 75)."""

    exit_code = ExitCode.TEMPORARY
