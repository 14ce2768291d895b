"""Which files a batch job scores: every image below a folder, or every file a glob names."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from training.batch.schema import ImageFile, describe_file
from training.data import walk_images

GLOB_CHARACTERS = frozenset("*?[")
MASK_FOLDER = "mask_images"  # AITEX ground-truth masks: labels, not strips to score


class BatchInputError(ValueError):
    """The input names no file to score; the message says which and why, in one line."""


def _absolute(path: Path) -> Path:
    """Absolute and normalised, links kept: a row names the file as the archive does."""
    return Path(os.path.abspath(path))


def _glob_root(pattern: str) -> Path:
    """The folder a glob starts from: its parts before the first one with a wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if GLOB_CHARACTERS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


def find_images(spec: str, exclude: Sequence[Path] = ()) -> tuple[Path, list[ImageFile]]:
    """The input's root folder and its files, sorted by path.

    A folder: every image file below it (by extension, as the data loaders find them; hidden
    files and AITEX ``Mask_images`` folders left out). A glob (``*``, ``?``, ``[``; ``**``
    recurses): every file it matches, whatever its extension, so a file that is not an image
    gets a row that says so. A single file: that file. Files below ``exclude`` (the job's own
    output, work and report folders, when they lie inside the input) are left out.
    """
    if GLOB_CHARACTERS & set(spec):
        root = _absolute(_glob_root(spec))
        paths = [_absolute(Path(p)) for p in glob.glob(spec, recursive=True)]
        paths = [p for p in paths if p.is_file()]
        if not paths:
            raise BatchInputError(f"--input {spec}: the pattern matches no file")
    else:
        given = Path(spec).expanduser()
        if given.is_file():
            root, paths = _absolute(given.parent), [_absolute(given)]
        elif given.is_dir():
            root = _absolute(given)
            paths = [
                p
                for p in walk_images(root)
                if MASK_FOLDER not in (part.lower() for part in p.relative_to(root).parts[:-1])
            ]
            if not paths:
                raise BatchInputError(f"--input {spec}: no image files in this folder")
        else:
            raise BatchInputError(f"--input {spec}: no such file or folder")
    skipped = [_absolute(folder) for folder in exclude]
    paths = [p for p in paths if not any(p.is_relative_to(folder) for folder in skipped)]
    if not paths:
        raise BatchInputError(f"--input {spec}: no file outside the job's own output and report")
    images = [describe_file(p, root, p.stat().st_size) for p in sorted(set(paths))]
    return root, images
