"""The converter's one error type: the message names the input and the fix, for a one-line CLI error."""


class ConvertError(RuntimeError):
    """A checkpoint that cannot be converted, or an export that failed its verification."""
