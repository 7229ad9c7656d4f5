"""One exception type for every input problem a user can fix.

Stages raise :class:`SpmlError` with a one-line message that names the offending thing and says
what to do; the CLI prints it without a traceback and exits non-zero.
"""

import re
from pathlib import Path


class SpmlError(Exception):
    """A user-fixable error: bad params, missing or corrupt input, unknown name."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> SpmlError:
    return SpmlError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


def bomb_error(path: Path, exc: Exception) -> SpmlError:
    """One line for an image whose header claims more pixels than Pillow decodes (its DecompressionBombError):
    the file and its pixel count against the limit."""
    numbers = [int(group) for match in re.findall(r"\((\d+) pixels\)|limit of (\d+)", str(exc))
               for group in match if group]
    size = f"{numbers[0]:,} pixels, over the limit of {numbers[1]:,}" if len(numbers) == 2 else str(exc)
    return SpmlError(f"image {path} is too large to decode ({size}; a decompression bomb or a wrong file); "
                     "replace it with the real image")


def missing_image_error(path: Path) -> SpmlError:
    """One line for a file the label table lists that is not on disk."""
    return SpmlError(f"image {path} is listed in the label table but missing; restore it or rerun "
                     "`spml download` and `spml prepare`")
