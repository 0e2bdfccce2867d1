"""One error type per failure family.

Library code raises these with a one-line message naming the file/flag/key, the bad value and what is valid;
only the entry point turns them into `error: ...` on stderr and exit code 2.
"""


class LoraForgeError(Exception):
    """Base class of every user-facing error."""


class ConfigError(LoraForgeError):
    """A command-line flag, TOML key or environment variable has a bad value."""


class DatasetError(LoraForgeError):
    """Images, captions or the dataset layout cannot be used."""


class ModelError(LoraForgeError):
    """A base model or LoRA file cannot be found, recognised or loaded."""


class OptimizerError(ConfigError):
    """An optimizer name or optimizer setting is invalid."""


class OptimizerUnavailable(OptimizerError):
    """The optimizer exists but cannot run here (missing package, needs CUDA, ...)."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A third-party exception's message as one line of at most `limit` characters, to quote in our own."""
    return " ".join(str(exc).split())[:limit]
