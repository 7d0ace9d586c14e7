"""Atomic creation of output folders: write into a temporary sibling, then rename.

A reader never sees a half-written model folder: the temporary folder is removed when
anything fails, including Ctrl-C, and an existing destination is only replaced when the
caller asks for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lieq_mlx.errors import OutputExistsError


def check_destination(destination: Path, force: bool) -> None:
    """Raise `OutputExistsError` when `destination` exists and `force` is False."""
    if destination.exists() and not destination.is_dir():
        raise OutputExistsError(f"output path {destination} is a file, not a folder; choose another path")
    if destination.exists() and not force:
        raise OutputExistsError(
            f"output folder {destination} already exists; pass --force to replace it "
            "or choose another path"
        )


@contextmanager
def atomic_folder(destination: str | Path, force: bool = False):
    """Yield a temporary folder that becomes `destination` when the block succeeds."""
    destination = Path(destination).expanduser().resolve()
    check_destination(destination, force)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp creates 0700; give the folder the usual mode.
    try:
        yield staging
        if destination.exists():
            # The old folder is moved aside and deleted only once the new one is in place.
            retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            retired.rmdir()
            destination.rename(retired)
            staging.rename(destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
