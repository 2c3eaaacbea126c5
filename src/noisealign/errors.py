"""User-facing errors.

Every error a user can fix by changing their input derives from :class:`NoiseAlignError`;
the command line prints its one-line message (which names the problem and the fix) and
exits with status 2 instead of showing a traceback.
"""


class NoiseAlignError(Exception):
    """An error caused by user input; its message says what is wrong and how to fix it."""


class ConfigError(NoiseAlignError, ValueError):
    """A malformed recipe: unknown key, wrong type, invalid value."""


class PipelineError(NoiseAlignError):
    """A pipeline that cannot be loaded or does not fit the policy / reward model."""


class JudgeError(NoiseAlignError):
    """An unknown judge, or a judge that cannot be built."""


class DataError(NoiseAlignError):
    """Missing or malformed prompts, datasets, or output folders."""


class Interrupted(BaseException):
    """SIGTERM arrived; raised in the main thread so the stage unwinds through its ``finally``
    blocks.

    A ``BaseException`` like ``KeyboardInterrupt``, so no library's ``except Exception`` swallows
    it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"received signal {signum}")
        self.signum = signum
