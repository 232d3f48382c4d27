"""The exceptions for user mistakes: `LLMasOSError`, the base the CLI catches to print the message (no
traceback, a non-zero exit), and its kinds: `CheckpointError` (weights that cannot be read), `ConfigError`
(a bad key or value), `InvalidRequestError` (a generation request out of range; `param` names the field,
for the server's 400) and its `ContextLengthError` (a prompt that does not fit the context).

Packages define more kinds where they own the input (`TaskError`, `InputError`, ...); all derive from
`LLMasOSError`."""


class LLMasOSError(Exception):
    """Bad input from the user (a wrong path, a malformed file, an unknown key).

    The message names what is wrong: the file, tensor, line, field or value.
    """


class CheckpointError(LLMasOSError):
    """A checkpoint that cannot be read: missing, truncated, mis-shaped or unsupported."""


class ConfigError(LLMasOSError):
    """A configuration with an unknown key, a wrong type or an unsupported setting."""


class InvalidRequestError(LLMasOSError):
    """A generation request with a value out of range; `param` names the field, so the server can report it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidRequestError):
    """A prompt, or a prompt plus the tokens asked for, that does not fit the model's context."""
