"""The error hierarchy of prunecp.

Every error a user can cause is a :class:`PrunecpError` subclass whose message says what is wrong,
why, and how to fix it, in one line. Only ``app.py`` turns them into a stderr line and an exit code:

* ``2`` :class:`UsageError`: a flag or value the user gave is not acceptable.
* ``3`` :class:`InputError` and subclasses: a checkpoint, data file, scores file or certificate is
  unreadable or inconsistent, or the request cannot be met with the data given.
* ``4`` :class:`CertificationFailed`: ``certify`` found that the certificate does not hold.

Anything else that escapes is a bug and exits with ``1``.
"""

from __future__ import annotations


class PrunecpError(Exception):
    """Base class of every error prunecp reports to a user.

    A message about an API argument names it as the API does (``target_flops``), and the command
    line shows the flag instead (``--target-flops``): such a message is a template with ``{field}``
    placeholders and ``arguments`` maps each field to its argument (see :meth:`render`).
    """

    exit_code: int = 1

    def __init__(self, message: str = "", *, arguments: dict[str, str] | None = None) -> None:
        self.template = message
        self.arguments = dict(arguments or {})
        super().__init__(self.render(lambda argument: argument))

    def prefixed(self, prefix: str, **arguments: str) -> PrunecpError:
        """The same error (same class) with ``prefix`` (a template, like the message) in front."""
        return type(self)(prefix + self.template, arguments={**self.arguments, **arguments})

    def render(self, name_of) -> str:
        """The message with every ``{field}`` named by ``name_of(argument)`` (e.g. its command-line flag).

        Fields are replaced literally, so other braces in the message (a dict, a set) stay as they are.
        """
        text = self.template
        for key, argument in self.arguments.items():
            text = text.replace("{" + key + "}", name_of(argument))
        return text


class UsageError(PrunecpError):
    """A command-line value is out of range or options contradict each other."""

    exit_code = 2


class InputError(PrunecpError):
    """An input file or its content cannot be used."""

    exit_code = 3


class CheckpointError(InputError):
    """A checkpoint is unreadable or does not match the architecture."""


class DataError(InputError):
    """A data file is unreadable, malformed or inconsistent with the model."""


class PlanError(InputError):
    """A pruning request cannot be met, or the pruned model fails its validation."""


class ScoresError(InputError):
    """An ``importance.json`` file is malformed or belongs to another model."""


class CalibrationError(InputError):
    """Calibration is impossible with the data given (too few points, reused data, ...)."""


class CertificateError(InputError):
    """A certificate file is malformed or of an unknown schema."""


class CertificationFailed(PrunecpError):
    """``certify`` found that a certificate does not hold for the model and data."""

    exit_code = 4


def brief(exc: BaseException, *, limit: int = 240) -> str:
    """The first line of a library exception's message, shortened between sentences, never inside one.

    Whole sentences are kept while they fit in ``limit`` characters; a first sentence longer than that
    is kept whole up to 1,000 characters and only then cut at a word with "…". An empty message gives
    the exception's class name.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if len(text) <= limit:
        return text
    sentences = [s for s in text.replace(". ", ".\0").split("\0") if s]
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > limit:
            break
        kept += " " + sentence
    if len(kept) > 1000:
        kept = kept[:1000].rsplit(" ", 1)[0] + "…"
    return kept
