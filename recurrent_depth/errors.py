"""The exception types users catch: each is a ValueError whose message names what is wrong and where."""


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read into this model (missing, unexpected or misshapen tensors, unsupported
    options, unreadable steps), or a save that storage did not take; the message names the tensor, field or step."""


class ChatDataError(ValueError):
    """A malformed chat row; the message names the file and line."""


class TaskFileError(ValueError):
    """An evaluation task file that cannot be used; the message names the file and, where it applies, the line."""
