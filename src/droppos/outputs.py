"""How droppos writes a file where the user pointed: whole or not at all, never through a link.

Every output is written to a temporary file droppos creates in the same folder (a fresh name,
created exclusively, so nothing else can be there), then renamed over its name: a reader never
sees half a file, a kill leaves the previous one, and a symbolic link (even a dangling one)
that sits where the output goes is replaced, never written through. The file gets the mode a
plain `open(..., "w")` would give it (the user's umask), so a teammate can read an export.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

# Every partial file droppos writes ends so (`.last.pth.k2j4x9.droppos-partial`): a name no user
# would choose, so that cleaning up after a killed save can never remove a user's own file.
PARTIAL_SUFFIX = ".droppos-partial"


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (`/proc`)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replaced(path: str | Path, mode: int = 0o666) -> Iterator[Path]:
    """`with replaced(path) as temporary:` write `temporary` (by name); on leaving, it is
    synced and renamed over `path`. It is created fresh (`O_EXCL`: nothing else, no link, can
    be there) with `mode` less the umask, as a plain `open(..., "w")` creates a file. On an
    error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.chmod(temporary, mode & ~umask())  # a writer may have made the file anew (safetensors)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None], mode: int = 0o666) -> Path:
    """`write(stream)` into a temporary file, then `replaced` over `path`."""
    with replaced(path, mode) as temporary, open(temporary, "wb") as stream:
        write(stream)
    return Path(path)


def write_text(path: str | Path, text: str, mode: int = 0o666) -> Path:
    """`path` holds `text` (UTF-8), written as `replaced` says."""
    return write_atomic(path, lambda stream: stream.write(text.encode("utf-8")), mode)


def open_for_append(path: str | Path) -> IO[str]:
    """A log to append to (`metrics.jsonl`), created with the umask's mode; a symbolic link
    in its place is refused (`O_NOFOLLOW`) instead of followed."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        if Path(path).is_symlink():
            raise ValueError(
                f"{path} is a symbolic link: droppos appends only to files it made; remove it"
            ) from None
        raise error
    return os.fdopen(descriptor, "a", buffering=1, encoding="utf-8")
