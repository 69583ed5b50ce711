"""User-facing errors.

Every error a user can cause (bad model, bad file, bad policy) is an ``AttnforgeError``
whose message is one line naming the problem and what to do. The CLI prints it without a
traceback; library callers can catch it.
"""


class AttnforgeError(Exception):
    """Base class: the message is meant for a person, one line."""


class CaptureError(AttnforgeError):
    """torch.export could not capture the model."""


class PolicyError(AttnforgeError):
    """A policy string or dict could not be parsed or applied."""


class InputError(AttnforgeError):
    """A file or argument given to attnforge is unusable."""


class BackendError(AttnforgeError):
    """A backend cannot run here or cannot run this program."""


class VerificationError(AttnforgeError):
    """The rewritten program differs from the model and nothing attnforge can roll back fixes it."""


def first_line(err: BaseException, limit: int = 200, default: str = "") -> str:
    """The first line of an exception's message, cut to ``limit`` characters (``default`` when the
    message is empty): how a cause is quoted inside our one-line errors."""
    return (str(err).strip().splitlines() or [default])[0][:limit]
