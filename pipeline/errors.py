"""One exception type for every input problem a user can fix.

Stages raise :class:`SpmlError` with a one-line message that names the offending thing and says
what to do; the CLI prints it without a traceback and exits non-zero.
"""


class SpmlError(Exception):
    """A user-fixable error: bad params, missing or corrupt input, unknown name."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> SpmlError:
    return SpmlError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
