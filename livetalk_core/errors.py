"""Errors the pack raises on purpose.

Each one carries a message written for the person running the model: what went wrong, with
which file or input, and what to do about it. Nodes and the CLI show the message as is.
"""


class LiveTalkError(Exception):
    """Base class: a problem the user can fix (bad input, wrong file, missing weights)."""


class CheckpointError(LiveTalkError):
    """A model file is missing, unreadable, or is not the model it was picked as."""


class InputError(LiveTalkError):
    """An image, audio clip, prompt or option cannot be used as given."""


class MissingWeightsError(LiveTalkError):
    """Required weight files are not on disk and cannot be downloaded here."""


class OutOfMemory(LiveTalkError):
    """The GPU ran out of memory; the message lists what to change."""


def out_of_memory_help(options: str) -> str:
    """The message for a GPU out-of-memory failure; ``options`` are the caller's own ways to need less memory."""
    return (
        f"The GPU ran out of memory. Options: {options}; close other programs using the GPU, or run on a GPU "
        "with more memory (the 'Speed and memory' table in the README gives the peak of each path)."
    )
