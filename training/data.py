"""Datasets on disk: the AITEX, MVTec AD and plain-folder layouts, splits and a fingerprint.

A :class:`Dataset` is a list of :class:`Sample` records (paths and labels); pixels are read
only when asked for, with :func:`load_image` and :func:`load_mask`. Three layouts are read:

* AITEX: ``Defect_images/``, ``Mask_images/`` and ``NoDefect_images/<roll>/`` anywhere below
  the root (folder names matched case-insensitively), files named ``nnnn_ddd_ff.png`` with
  defect code ``ddd`` and fabric code ``ff``; masks ``<stem>_mask.png`` or
  ``<stem>_mask1.png``, ``<stem>_mask2.png``, ... (combined with OR).
* MVTec AD: ``<category>/train/good/``, ``<category>/test/<defect or good>/`` and
  ``<category>/ground_truth/<defect>/<stem>_mask.png``; the root may be one category folder.
* Plain folders: ``normal/``, ``anomalous/`` (a subfolder names the defect type) and
  ``masks/`` matched to anomalous images by stem (``<stem>.png`` or ``<stem>_mask*.png``).
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.preprocessing import decode_image

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LAYOUTS = ("aitex", "mvtec", "folder")

_AITEX_NAME = re.compile(r"^(?P<id>\d+)_(?P<defect>\d{3})_(?P<fabric>\d{2})$")
_MASK_SUFFIX = re.compile(r"^(?P<owner>.+?)_mask(?P<index>\d*)$", re.IGNORECASE)
_AITEX_DEFECT_DIR = "defect_images"
_AITEX_MASK_DIR = "mask_images"
_AITEX_NORMAL_DIR = "nodefect_images"


class DatasetError(ValueError):
    """A data folder Loomwatch cannot use; the message says which path and why, in one line."""


@dataclass(frozen=True)
class Sample:
    """One image on disk with what is known about it."""

    image: Path
    masks: tuple[Path, ...]
    label: int
    defect: str | None
    fabric: str | None
    subset: str | None = None

    @property
    def name(self) -> str:
        return self.image.stem


@dataclass(frozen=True)
class Dataset:
    """The samples found below ``root``, in a stable (sorted) order."""

    root: Path
    layout: str
    samples: tuple[Sample, ...]

    @property
    def normal(self) -> tuple[Sample, ...]:
        return tuple(sample for sample in self.samples if sample.label == 0)

    @property
    def anomalous(self) -> tuple[Sample, ...]:
        return tuple(sample for sample in self.samples if sample.label == 1)

    @property
    def fabrics(self) -> tuple[str, ...]:
        return tuple(sorted({s.fabric for s in self.samples if s.fabric is not None}))

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class AitexName:
    """What an AITEX file name ``nnnn_ddd_ff`` says: image number, defect code, fabric code."""

    number: str
    defect: str  # "000": defect-free
    fabric: str


def parse_aitex_name(stem: str) -> AitexName | None:
    """The parts of an AITEX file name (without its extension); None for any other name."""
    match = _AITEX_NAME.match(stem)
    if match is None:
        return None
    return AitexName(match.group("id"), match.group("defect"), match.group("fabric"))


@dataclass(frozen=True)
class Split:
    """Defect-free images to fit on, and everything kept back for validation/calibration."""

    train: tuple[Sample, ...]
    validation: tuple[Sample, ...]


# --- walking the file system -------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def walk_images(folder: Path) -> Iterator[Path]:
    """Image files below ``folder``, skipping hidden files and folders (``._x.png``, ``.git``)."""
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and _is_image(path):
            yield path


def _subfolders(folder: Path) -> dict[str, Path]:
    """Immediate subfolders by lower-cased name."""
    return {
        child.name.lower(): child
        for child in sorted(folder.iterdir())
        if child.is_dir() and not child.name.startswith(".")
    }


def _folders_named(root: Path, name: str) -> list[Path]:
    """Every folder below ``root`` (or ``root`` itself) whose name is ``name``, any case."""
    found = [root] if root.name.lower() == name else []
    found += [
        path
        for path in root.rglob("*")
        if path.is_dir()
        and path.name.lower() == name
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found)


def _mask_owner(stem: str) -> tuple[str, int]:
    """The image stem a mask file belongs to, and its order among that image's masks."""
    match = _MASK_SUFFIX.match(stem)
    if match is None:
        return stem, -1
    index = match.group("index")
    return match.group("owner"), int(index) if index else 0


def _index_masks(folders: Iterable[Path]) -> dict[str, list[tuple[int, Path]]]:
    masks: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for folder in folders:
        for path in walk_images(folder):
            owner, index = _mask_owner(path.stem)
            masks[owner].append((index, path))
    return masks


def _ordered(masks: list[tuple[int, Path]]) -> tuple[Path, ...]:
    return tuple(path for _, path in sorted(masks, key=lambda item: (item[0], str(item[1]))))


def _is_mvtec_category(folder: Path) -> bool:
    children = _subfolders(folder)
    return "train" in children and "test" in children


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"data path {root} is not a folder")


# --- layouts ------------------------------------------------------------------------------


def detect_layout(root: Path) -> str:
    """``"aitex"``, ``"mvtec"`` or ``"folder"``; :class:`DatasetError` when none fits."""
    root = Path(root)
    _check_root(root)
    children = _subfolders(root)
    if "normal" in children or "anomalous" in children:
        return "folder"
    if _is_mvtec_category(root) or any(_is_mvtec_category(c) for c in children.values()):
        return "mvtec"
    if _folders_named(root, _AITEX_DEFECT_DIR) or _folders_named(root, _AITEX_NORMAL_DIR):
        return "aitex"
    raise DatasetError(
        f"{root}: data layout not recognised (expected AITEX Defect_images/ and "
        "NoDefect_images/, MVTec AD <category>/train/good/ and test/, or normal/ and anomalous/)"
    )


def _load_aitex(root: Path) -> list[Sample]:
    masks = _index_masks(_folders_named(root, _AITEX_MASK_DIR))
    samples: list[Sample] = []
    seen: set[Path] = set()
    for label, folder_name in ((1, _AITEX_DEFECT_DIR), (0, _AITEX_NORMAL_DIR)):
        for folder in _folders_named(root, folder_name):
            for path in walk_images(folder):
                parts = path.relative_to(root).parts
                inside_masks = _AITEX_MASK_DIR in (part.lower() for part in parts)
                if path in seen or inside_masks:  # nested folders: count each file once
                    continue
                seen.add(path)
                name = parse_aitex_name(path.stem)
                fabric = name.fabric if name else None
                defect: str | None = None
                if label == 1:
                    defect = name.defect if name else "unknown"
                samples.append(
                    Sample(
                        image=path,
                        masks=_ordered(masks.get(path.stem, [])) if label == 1 else (),
                        label=label,
                        defect=defect,
                        fabric=fabric,
                    )
                )
    return samples


def _load_mvtec_category(folder: Path) -> list[Sample]:
    category = folder.name
    children = _subfolders(folder)
    truth_dir = children.get("ground_truth")
    truth = {
        name: _index_masks([path])
        for name, path in (_subfolders(truth_dir).items() if truth_dir else [])
    }
    samples: list[Sample] = []
    for subset in ("train", "test"):
        for kind_name, kind_dir in _subfolders(children[subset]).items():
            good = kind_name == "good"
            defect_masks = truth.get(kind_name, {})
            for path in walk_images(kind_dir):
                samples.append(
                    Sample(
                        image=path,
                        masks=() if good else _ordered(defect_masks.get(path.stem, [])),
                        label=0 if good else 1,
                        defect=None if good else kind_dir.name,
                        fabric=category,
                        subset=subset,
                    )
                )
    return samples


def _load_mvtec(root: Path) -> list[Sample]:
    if _is_mvtec_category(root):
        return _load_mvtec_category(root)
    samples: list[Sample] = []
    for child in _subfolders(root).values():
        if _is_mvtec_category(child):
            samples += _load_mvtec_category(child)
    return samples


def _load_folder(root: Path) -> list[Sample]:
    children = _subfolders(root)
    samples: list[Sample] = []
    if "normal" in children:
        samples += [
            Sample(image=path, masks=(), label=0, defect=None, fabric=None)
            for path in walk_images(children["normal"])
        ]
    if "anomalous" not in children:
        return samples
    anomalous_dir = children["anomalous"]
    masks_dir = children.get("masks")
    masks = _index_masks([masks_dir] if masks_dir else [])
    for path in walk_images(anomalous_dir):
        relative_dir = path.parent.relative_to(anomalous_dir)
        defect = relative_dir.parts[0] if relative_dir.parts else "anomalous"
        candidates = masks.get(path.stem, [])
        if masks_dir is not None:
            # Same stem in several defect folders: prefer the mask in the matching subfolder.
            same_place = [
                (index, mask)
                for index, mask in candidates
                if mask.parent.relative_to(masks_dir) == relative_dir
            ]
            candidates = same_place or candidates
        samples.append(
            Sample(image=path, masks=_ordered(candidates), label=1, defect=defect, fabric=None)
        )
    return samples


_LOADERS = {"aitex": _load_aitex, "mvtec": _load_mvtec, "folder": _load_folder}


def _normalise_fabric(fabric: str, layout: str) -> str:
    fabric = fabric.strip()
    if layout == "aitex" and fabric.isdigit():
        return fabric.zfill(2)
    return fabric


def _select_fabric(samples: list[Sample], fabric: str, layout: str, root: Path) -> list[Sample]:
    present = sorted({s.fabric for s in samples if s.fabric is not None})
    if not present:
        raise DatasetError(f"{root}: this {layout} layout has no fabric codes; omit the fabric")
    wanted = _normalise_fabric(fabric, layout)
    matches = [code for code in present if code.lower() == wanted.lower()]
    if not matches:
        raise DatasetError(
            f"{root}: fabric {fabric!r} not found; fabrics present: {', '.join(present)}"
        )
    return [s for s in samples if s.fabric == matches[0]]


def load_dataset(root: Path | str, fabric: str | None = None, layout: str = "auto") -> Dataset:
    """Find every image below ``root`` in the given (or detected) layout.

    ``fabric`` keeps one AITEX fabric code (``"02"`` or ``"2"``) or one MVTec category.
    """
    root = Path(root)
    _check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    elif layout not in LAYOUTS:
        raise DatasetError(f"unknown data layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    samples = _LOADERS[layout](root)
    if not samples:
        raise DatasetError(f"{root}: no images found for the {layout} layout")
    if fabric is not None:
        samples = _select_fabric(samples, fabric, layout, root)
    ordered = sorted(samples, key=lambda sample: _relative_key(sample.image, root))
    return Dataset(root=root, layout=layout, samples=tuple(ordered))


# --- pixels ----------------------------------------------------------------------------------


def evenly_spread(samples: list[Sample], limit: int) -> list[Sample]:
    """At most ``limit`` of ``samples``, evenly spread over them in their order (distinct once
    rounded, since they are at least one apart)."""
    if len(samples) <= limit:
        return samples
    picks = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    return [samples[int(i)] for i in picks]


def load_image(sample: Sample) -> np.ndarray:
    """The sample's image as H x W uint8 grey (raises ``ImageDecodeError`` naming the file)."""
    return decode_image(sample.image)


def load_mask(sample: Sample, shape: tuple[int, int]) -> np.ndarray:
    """Boolean H x W defect mask: the OR of the sample's masks, each binarised at > 127.

    All False when the sample has no mask. A mask whose size differs from ``shape`` is an error.
    """
    combined = np.zeros(shape, dtype=bool)
    for path in sample.masks:
        mask = decode_image(path)
        if mask.shape != tuple(shape):
            raise DatasetError(
                f"mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image "
                f"{sample.image.name} is {shape[1]}x{shape[0]}"
            )
        combined |= mask > 127
    return combined


def has_pixel_labels(sample: Sample) -> bool:
    """True for a defective sample with at least one mask file (pixel metrics apply)."""
    return sample.label == 1 and bool(sample.masks)


# --- splits and fingerprint ----------------------------------------------------------------


def _relative_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def recorded_split(dataset: Dataset, training: Mapping[str, Any]) -> Split:
    """The split a model was trained with, from its manifest's ``training`` record
    (``val_fraction`` and ``seed``; the defaults where it has none)."""
    val_fraction, seed = training.get("val_fraction"), training.get("seed")
    return split_dataset(
        dataset,
        float(val_fraction) if isinstance(val_fraction, int | float) else 0.3,
        int(seed) if isinstance(seed, int) else 0,
    )


def split_dataset(dataset: Dataset, val_fraction: float = 0.3, seed: int = 0) -> Split:
    """Split defect-free images into train/validation; every other image goes to validation.

    Defective images never reach training. MVTec ``test`` images all go to validation. Of the
    remaining defect-free images, ``val_fraction`` (rounded; at least one when the fraction is
    above zero and there are two or more; never all of them) are drawn with ``seed`` for
    validation. The result depends only on the files and the seed, not on the order the file
    system lists them in.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ordered = sorted(dataset.samples, key=lambda s: _relative_key(s.image, dataset.root))
    candidates = [s for s in ordered if s.label == 0 and s.subset != "test"]
    if not candidates:
        raise DatasetError(f"{dataset.root}: no defect-free images left to train on")
    shuffled = list(candidates)
    random.Random(seed).shuffle(shuffled)
    count = len(shuffled)
    n_val = math.floor(val_fraction * count + 0.5)
    if count >= 2 and val_fraction > 0:
        n_val = max(n_val, 1)
    n_val = min(n_val, count - 1)
    chosen = set(shuffled[:n_val])
    train = tuple(s for s in candidates if s not in chosen)
    validation = tuple(s for s in ordered if s in chosen or s.label == 1 or s.subset == "test")
    return Split(train=train, validation=validation)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from exc


def fingerprint(samples: Iterable[Sample], root: Path | str) -> str:
    """SHA-256 over the sorted relative paths and sizes of every image and mask file."""
    root = Path(root)
    files = {path for sample in samples for path in (sample.image, *sample.masks)}
    entries = sorted((_relative_key(path, root), _file_size(path)) for path in files)
    digest = hashlib.sha256()
    for relative, size in entries:
        digest.update(f"{relative}\t{size}\n".encode())
    return digest.hexdigest()
