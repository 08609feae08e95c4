"""Image data for vision-language models: image folders, files with an image column, datasets.

Three sources become a :class:`~chiptuning.tasks.base.TaskData` whose examples hold an
:class:`ImageRef` in their image column (``task.image_column``):

* an **image folder**, one subfolder per class (``root/daisy/001.jpg``); ``--split NAME`` reads
  ``root/NAME/<class>/...`` when that folder exists. Labels are the subfolder names (integer names
  in numeric order), or ``--labels`` in the order given;
* a **JSONL / CSV / Parquet file** with an image column (``--image-column``) holding paths
  relative to the file (or absolute), or the ``{"bytes", "path"}`` records ``datasets`` writes to
  Parquet, and a label column;
* a **Hugging Face dataset** (``--task NAME`` or a ``datasets.Dataset``) with an ``Image`` column
  (``image`` is found by itself); its images are read from the dataset's own files when needed,
  never all decoded at once.

The prompt is the task's template (default :data:`DEFAULT_IMAGE_PROMPT`, the paper's question);
:meth:`TaskData.build_prompts` puts it and the image placeholder in the processor's chat template.
Images are only *referenced* here: they are decoded by :func:`open_image` when a batch needs them,
and a missing or unreadable file is a :class:`~chiptuning.errors.DataError` naming it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from chiptuning.errors import DataError
from chiptuning.tasks.base import Example, TaskData, template_fields
from chiptuning.tasks.files import infer_label_names, record_labels

log = logging.getLogger(__name__)

#: The question the paper asks about every image (Section 4.3).
DEFAULT_IMAGE_PROMPT = "What type of object is in this photo?"
#: File name endings read as images in an image folder (others are skipped, and counted).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class ImageRef:
    """Where one image's bytes are (a file, bytes in memory, a row of a dataset) and how error
    messages name it. Reading is deferred until a batch needs the image.

    Attributes:
        name: the image's name in messages (a path, or ``dataset row N``).
        path: the file, when the image is one.
    """

    __slots__ = ("name", "path", "_read")

    def __init__(self, name: str, read: Callable[[], bytes], path: Path | None = None) -> None:
        self.name = name
        self.path = path
        self._read = read

    @classmethod
    def from_file(cls, path: str | Path, name: str | None = None) -> ImageRef:
        path = Path(path)
        return cls(name or str(path), path.read_bytes, path)

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> ImageRef:
        return cls(name, lambda: data)

    def read(self) -> bytes:
        """The image file's bytes.

        Raises:
            DataError: a missing or unreadable file, naming it.
        """
        try:
            data = self._read()
        except FileNotFoundError:
            raise DataError(f"image {self.name} does not exist (was it moved or deleted?)") from None
        except OSError as err:
            raise DataError(f"cannot read image {self.name}: {err.strerror or err}") from None
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise DataError(f"image {self.name} is empty")
        return bytes(data)

    def __repr__(self) -> str:
        return f"ImageRef({self.name!r})"


def image_name(image: Any, index: int | None = None) -> str:
    """How messages name an image input (its file, or its position)."""
    if isinstance(image, ImageRef):
        return image.name
    return f"image {index}" if index is not None else type(image).__name__


def decode_bytes(data: bytes, name: str) -> Image.Image:
    """Decode an image file's bytes completely, as RGB.

    Raises:
        DataError: bytes that are not a readable image (corrupt, truncated, another file type).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    # PIL reports a bad file as UnidentifiedImageError, OSError ("truncated"), ValueError,
    # SyntaxError or a decompression-bomb error depending on the format: all mean "not an image".
    except Exception as err:  # noqa: BLE001
        raise DataError(f"image {name} is not a readable image ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no details'}); fix or remove the file") from None


def open_image(image: Any, index: int | None = None) -> Image.Image:
    """An image input as a decoded RGB ``PIL.Image``: an :class:`ImageRef`, a path, a PIL image or
    an array ((H, W) gray or (H, W, 3|4) color, uint8 or floats in [0, 1]).

    Raises:
        DataError: a missing, unreadable or undecodable image, or an array that is not an image.
    """
    if isinstance(image, (str, Path)):
        image = as_image_input(image, index)
    if isinstance(image, ImageRef):
        return decode_bytes(image.read(), image.name)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return array_to_image(image, index)
    raise DataError(f"{image_name(image, index)} is a {type(image).__name__}; give a path, a PIL image or an array")


def array_to_image(array: np.ndarray, index: int | None = None) -> Image.Image:
    """An (H, W) or (H, W, C) array as an RGB PIL image (floats are read as values in [0, 1]).

    Raises:
        DataError: another shape, or an empty array.
    """
    name = image_name(array, index)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise DataError(f"{name} is an array of shape {array.shape}; an image is (H, W), (H, W, 3) or (H, W, 4)")
    if array.dtype != np.uint8:
        scaled = np.asarray(array, dtype=np.float64)
        if scaled.size and scaled.max() <= 1.0:
            scaled = scaled * 255.0
        array = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def as_image_input(image: Any, index: int | None = None) -> Any:
    """One image given to a classifier, ready for the processor: a path becomes an
    :class:`ImageRef` (checked to exist); PIL images, arrays and refs pass through.

    Raises:
        DataError: a path that does not exist, or something that is not an image.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise DataError(f"image file {path} does not exist")
        return ImageRef.from_file(path)
    if isinstance(image, (ImageRef, Image.Image)):
        return image
    if isinstance(image, np.ndarray):
        array_to_image(image, index)  # validate the shape now, not in the middle of a batch
        return image
    raise DataError(f"{image_name(image, index)} is a {type(image).__name__}; give a path, a PIL image or an array")


def image_size(image: Any, index: int | None = None) -> tuple[int, int]:
    """(width, height) of an image input, from the file's header (no decoding).

    Raises:
        DataError: a missing, unreadable or unrecognised file.
    """
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        return (int(image.shape[1]), int(image.shape[0]))
    if isinstance(image, (str, Path)):
        image = as_image_input(image, index)
    if not isinstance(image, ImageRef):
        raise DataError(f"{image_name(image, index)} is a {type(image).__name__}; give a path, a PIL image or an array")
    try:
        if image.path is not None:  # a file: PIL reads only its header
            try:
                with Image.open(image.path) as img:
                    return img.size
            except FileNotFoundError:
                raise DataError(f"image {image.name} does not exist (was it moved or deleted?)") from None
            except PermissionError as err:
                raise DataError(f"cannot read image {image.name}: {err.strerror or err}") from None
        with Image.open(io.BytesIO(image.read())) as img:
            return img.size
    except DataError:
        raise
    # as in decode_bytes: PIL's error type depends on the format
    except Exception as err:  # noqa: BLE001
        raise DataError(f"image {image.name} is not a readable image ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no details'}); fix or remove the file") from None


# -- image folders ---------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(
    root: str | Path,
    *,
    split: str | None = None,
    labels: list[str] | None = None,
    template: str | None = None,
    strip_trailing_space: bool = False,
    image_column: str = "image",
) -> TaskData:
    """An image folder (one subfolder per class) as a task.

    Args:
        root: the folder; with ``split`` naming one of its subfolders that holds class folders
            (``root/train/<class>/...``), that subfolder.
        split: the split's name (default the folder's name).
        labels: class names in class order (each a subfolder); default the subfolder names, integer
            names in numeric order.
        template: the prompt asked about each image (default :data:`DEFAULT_IMAGE_PROMPT`); a
            folder has no other fields, so it is fixed text.
        strip_trailing_space: drop the prompt's trailing space.
        image_column: the field the examples hold their image in.

    Raises:
        DataError: no class folders, a class folder without images, labels that are not folders.
    """
    root = Path(root)
    if split is not None and (root / split).is_dir() and _class_folders(root / split):
        root = root / split
    folders = _class_folders(root)
    if not folders:
        raise DataError(f"image folder {root} has no class subfolders; put each class's images in a "
                        "subfolder named after the class (e.g. {root}/daisy/001.jpg)")
    names = [p.name for p in folders]
    label_names = [str(x) for x in labels] if labels is not None else infer_label_names(names)
    unknown = sorted(set(names) - set(label_names))
    if unknown:
        raise DataError(f"image folder {root}: subfolder(s) {unknown} are not in --labels {label_names}; "
                        "add them to --labels or move them out")
    missing = [name for name in label_names if name not in names]
    if missing:
        raise DataError(f"image folder {root}: --labels {missing} have no subfolder (subfolders: {', '.join(names)})")
    if len(label_names) < 2:
        raise DataError(f"image folder {root} has one class ({label_names[0]}); a classifier needs two or more")
    template = DEFAULT_IMAGE_PROMPT if template is None else template
    if template_fields(template):
        raise DataError(f"--template {template!r} has fields {sorted(template_fields(template))}, but an image "
                        "folder has none; give the prompt as plain text")
    if strip_trailing_space:
        template = template.rstrip(" ")
    examples, skipped = [], 0
    for folder in folders:
        label = label_names.index(folder.name)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        images = [p for p in files if _is_image_file(p)]
        skipped += len(files) - len(images)
        if not images:
            raise DataError(f"image folder {root}: class folder {folder.name!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        for path in images:
            rel = path.relative_to(root).as_posix()
            examples.append(Example(id=rel, fields={image_column: ImageRef.from_file(path, str(path))}, label=label,
                                    n_choices=len(label_names)))
    if skipped:
        log.info("image folder %s: skipped %d files that are not images", root, skipped)
    return TaskData(
        name="custom", split=split or root.name, label_names=label_names, examples=examples, template=template,
        source={"image_folder": root.name, "n_images": len(examples)},
        strip_trailing_space=strip_trailing_space, image_column=image_column,
    )


# -- records with an image column ----------------------------------------------------------------


def _image_of(value: Any, base_dir: Path | None, where: str, n: int, column: str) -> Any:
    """A record's image value as an :class:`ImageRef` (or a PIL image held in memory)."""
    if isinstance(value, (ImageRef, Image.Image)):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            return ImageRef.from_bytes(value["bytes"], f"{value.get('path') or f'record {n}'} ({where}, record {n})")
        value = value["path"]
    if isinstance(value, (str, Path)) and str(value).strip():
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise DataError(f"{where}: record {n}: image file {path} does not exist (column {column!r}"
                            + (f", paths relative to {base_dir}" if base_dir is not None else "") + ")")
        return ImageRef.from_file(path, str(path))
    raise DataError(f"{where}: record {n} has no image in column {column!r} (found {type(value).__name__}: "
                    f"{str(value)[:40]!r}); give a path, or image bytes")


def build_image_task(
    records: list[dict[str, Any]],
    *,
    image_column: str,
    where: str,
    name: str,
    split: str,
    source: dict[str, Any],
    base_dir: Path | None = None,
    features: Any = None,
    images: list[Any] | None = None,
    template: str | None = None,
    label_column: str = "label",
    labels: list[str] | None = None,
    id_column: str = "id",
    strip_trailing_space: bool = False,
) -> TaskData:
    """Records with an image column as an image task (labels as in :mod:`chiptuning.tasks.files`).

    Args:
        records: the rows, as dicts.
        where: how to name the data in messages.
        image_column: the column holding each record's image: a path (relative to ``base_dir``),
            ``{"bytes", "path"}``, or a PIL image.
        base_dir: what relative image paths are relative to (the data file's folder).
        features: ``datasets.Features`` of the records (for ``ClassLabel`` names).
        images: the images themselves when they are not in ``records`` (a hub dataset's, read
            lazily from its files).
        template: the prompt (default :data:`DEFAULT_IMAGE_PROMPT`); may use the records' fields.
        Others: as :func:`chiptuning.tasks.load_task`.

    Raises:
        DataError: no records, a missing column or image file, a label outside the label set.
    """
    if not records:
        raise DataError(f"{where} holds no records")
    template = DEFAULT_IMAGE_PROMPT if template is None else template
    if strip_trailing_space:
        template = template.rstrip(" ")
    needed = template_fields(template)
    if image_column in needed:
        raise DataError(f"--template uses the image column {image_column!r} as text; the image goes in by itself")
    label_names, label_of = record_labels(records, where=where, needed=needed | ({image_column} if images is None else set()),
                                          label_column=label_column, labels=labels, features=features,
                                          options="--image-column / --template / --label-column")
    examples = []
    for n, (record, label) in enumerate(zip(records, label_of)):
        image = images[n] if images is not None else _image_of(record[image_column], base_dir, where, n, image_column)
        ex_id = record.get(id_column)
        fields = {k: v for k, v in record.items() if k != image_column}
        fields[image_column] = image
        examples.append(Example(id=str(n) if ex_id in (None, "") else str(ex_id), fields=fields, label=label,
                                n_choices=len(label_names)))
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        log.warning("%s: column %r has duplicate values; using row numbers as example ids", where, id_column)
        for n, ex in enumerate(examples):
            ex.id = str(n)
    task = TaskData(name=name, split=split, label_names=label_names, examples=examples, template=template,
                    source=source, strip_trailing_space=strip_trailing_space, image_column=image_column)
    for ex in examples:
        if not task.format(ex.fields).strip():
            raise DataError(f"{where}: example {ex.id!r} has an empty prompt")
    return task


def has_image_feature(features: Any, column: str) -> bool:
    """True when ``datasets.Features`` types ``column`` as an ``Image``."""
    return features is not None and column in features and type(features[column]).__name__ == "Image"


def dataset_images(dataset, column: str, where: str) -> tuple[list[dict[str, Any]], list[ImageRef], Any]:
    """The records of a ``datasets.Dataset`` without its image column, and a lazy
    :class:`ImageRef` per row reading that column's bytes from the dataset's own (memory-mapped)
    files, so no image is decoded, or held, before a batch needs it.

    Returns:
        (records, images, features).
    """
    features = dataset.features
    if has_image_feature(features, column):
        # datasets is heavy (~1 s) and optional offline: only a dataset object brings us here
        from datasets import Image as ImageFeature

        dataset = dataset.cast_column(column, ImageFeature(decode=False))
    records = dataset.remove_columns([column]).to_list()

    def reader(row: int) -> Callable[[], bytes]:
        def read() -> bytes:
            value = dataset[row][column]
            if isinstance(value, dict) and value.get("bytes"):
                return value["bytes"]
            if isinstance(value, dict) and value.get("path"):
                return Path(value["path"]).read_bytes()
            if isinstance(value, Image.Image):
                buffer = io.BytesIO()
                value.save(buffer, format="PNG")
                return buffer.getvalue()
            raise DataError(f"{where}: row {row} has no image in column {column!r}")
        return read

    images = [ImageRef(f"{where} row {row}", reader(row)) for row in range(len(records))]
    return records, images, features


__all__ = ["DEFAULT_IMAGE_PROMPT", "IMAGE_SUFFIXES", "ImageRef", "array_to_image", "as_image_input",
           "build_image_task", "dataset_images", "decode_bytes", "has_image_feature", "image_name", "image_size",
           "load_image_folder", "open_image"]
