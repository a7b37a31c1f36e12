"""Exceptions that the CLI turns into exit codes: 2 for bad input, 1 for work that failed."""


class DpvrSurgeryError(Exception):
    """Base class of the errors this package raises for a user to act on."""

    exit_code = 1


class InvalidInputError(DpvrSurgeryError, ValueError):
    """A model, file, option or data set that cannot be used as given (exit code 2)."""

    exit_code = 2


class VerificationError(DpvrSurgeryError):
    """A numerical check that failed, such as logits that differ from the source model (exit code 1)."""

    exit_code = 1
