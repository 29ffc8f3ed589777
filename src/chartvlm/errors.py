"""The one exception type the command line turns into a clean message (no stack trace)."""


class ChartVLMError(Exception):
    """A user-facing error: the message says what is wrong and what to change."""


class BadSampleError(ChartVLMError):
    """One input row cannot be used (missing image, corrupt bytes, no label, ...)."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")
