"""Image data for vision-language models: each example holds an :class:`ImageRef` in the task's
``image_column``, from an image folder (one subfolder per class, its name the label), a JSONL / CSV /
Parquet file whose image column holds paths relative to the file or ``{"bytes", "path"}`` records,
or a Hugging Face dataset's ``Image`` column. The prompt is the task's template (default
:data:`DEFAULT_IMAGE_PROMPT`). Images are decoded only when a batch needs them (:func:`open_image`);
a missing or unreadable file is a DataError naming it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from chiptuning.errors import DataError
from chiptuning.tasks.base import Example, TaskData, TaskOptions, template_fields
from chiptuning.tasks.files import Source, checked_task, example_ids, infer_label_names, read_source, record_labels

log = logging.getLogger(__name__)

#: The question the paper asks about every image (Section 4.3).
DEFAULT_IMAGE_PROMPT = "What type of object is in this photo?"
#: File name endings read as images in an image folder (others are skipped, and counted).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


def _os_error(name: str, err: OSError) -> DataError:
    missing = isinstance(err, FileNotFoundError)
    return DataError(f"image {name} does not exist (was it moved or deleted?)" if missing
                     else f"cannot read image {name}: {err.strerror or err}")


def _undecodable(name: str, err: Exception) -> DataError:
    return DataError(f"image {name} is not a readable image ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else 'no details'}); fix or remove the file")


class ImageRef:
    """Where one image's bytes are (a file, bytes in memory, a dataset's row), read when a batch
    needs them; ``name`` names it in messages, ``path`` is its file when it is one."""

    __slots__ = ("name", "path", "_read")

    def __init__(self, name: str, read: Callable[[], bytes], path: Path | None = None) -> None:
        self.name = name
        self.path = path
        self._read = read

    @classmethod
    def from_file(cls, path: str | Path) -> ImageRef:
        return cls(str(path), Path(path).read_bytes, Path(path))

    def read(self) -> bytes:
        """The image file's bytes (DataError naming a missing, unreadable or empty file)."""
        try:
            data = self._read()
        except OSError as err:
            raise _os_error(self.name, err) from None
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
    """Decode an image file's bytes completely, as RGB (DataError: corrupt, truncated, not an image)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    # PIL reports a bad file as UnidentifiedImageError, OSError ("truncated"), ValueError,
    # SyntaxError or a decompression-bomb error depending on the format: all mean "not an image".
    except Exception as err:  # noqa: BLE001
        raise _undecodable(name, err) from None


def open_image(image: Any, index: int | None = None) -> Image.Image:
    """An image input (:class:`ImageRef`, path, PIL image, array) as a decoded RGB ``PIL.Image``."""
    if isinstance(image, np.ndarray):
        return array_to_image(image, index)
    image = as_image_input(image, index)
    if isinstance(image, ImageRef):
        return decode_bytes(image.read(), image.name)
    return image if image.mode == "RGB" else image.convert("RGB")


def array_to_image(array: np.ndarray, index: int | None = None) -> Image.Image:
    """An (H, W) gray or (H, W, 3|4) color array, uint8 or floats in [0, 1], as an RGB PIL image
    (DataError for another shape, or an empty array)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise DataError(f"{image_name(array, index)} is an array of shape {array.shape}; an image is (H, W), "
                        "(H, W, 3) or (H, W, 4)")
    if array.dtype != np.uint8:
        scaled = np.asarray(array, dtype=np.float64)
        if scaled.size and scaled.max() <= 1.0:
            scaled = scaled * 255.0
        array = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def as_image_input(image: Any, index: int | None = None) -> Any:
    """One image given to a classifier: a path becomes an :class:`ImageRef` (checked to exist);
    PIL images, arrays (shape checked) and refs pass through; anything else is a DataError."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise DataError(f"image file {Path(image)} does not exist")
        return ImageRef.from_file(image)
    if isinstance(image, np.ndarray):
        array_to_image(image, index)  # check the shape now, not in the middle of a batch
    elif not isinstance(image, (ImageRef, Image.Image)):
        raise DataError(f"{image_name(image, index)} is a {type(image).__name__}; give a path, a PIL image or an array")
    return image


def image_size(image: Any, index: int | None = None) -> tuple[int, int]:
    """(width, height) of an image input, from the file's header (no decoding)."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray):
        return (int(image.shape[1]), int(image.shape[0]))
    ref = as_image_input(image, index)
    source = ref.path if ref.path is not None else io.BytesIO(ref.read())  # a file: PIL reads only its header
    try:
        with Image.open(source) as img:
            return img.size
    except (FileNotFoundError, PermissionError) as err:
        raise _os_error(ref.name, err) from None
    except Exception as err:  # noqa: BLE001  (as in decode_bytes: PIL's error type depends on the format)
        raise _undecodable(ref.name, err) from None


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _folder_labels(root: Path, folder_names: list[str], labels: list[str] | None) -> list[str]:
    label_names = labels if labels is not None else infer_label_names(folder_names)
    unknown = sorted(set(folder_names) - set(label_names))
    if unknown:
        raise DataError(f"image folder {root}: subfolder(s) {unknown} are not in --labels {label_names}; "
                        "add them to --labels or move them out")
    missing = [name for name in label_names if name not in folder_names]
    if missing:
        raise DataError(f"image folder {root}: --labels {missing} have no subfolder (subfolders: "
                        f"{', '.join(folder_names)})")
    if len(label_names) < 2:
        raise DataError(f"image folder {root} has one class ({label_names[0]}); a classifier needs two or more")
    return label_names


def load_image_folder(root: str | Path, opts: TaskOptions) -> TaskData:
    """An image folder (one subfolder per class, or ``root/SPLIT/<class>``) as a task; its prompt
    is fixed text (a folder has no fields)."""
    root = Path(root)
    if opts.split is not None and (root / opts.split).is_dir() and _class_folders(root / opts.split):
        root = root / opts.split
    folders = _class_folders(root)
    if not folders:
        raise DataError(f"image folder {root} has no class subfolders; put each class's images in a "
                        f"subfolder named after the class (e.g. {root}/daisy/001.jpg)")
    label_names = _folder_labels(root, [p.name for p in folders], opts.labels)
    template = DEFAULT_IMAGE_PROMPT if opts.template is None else opts.template
    if template_fields(template):
        raise DataError(f"--template {template!r} has fields {sorted(template_fields(template))}, but an image "
                        "folder has none; give the prompt as plain text")
    column = opts.image_column or "image"
    examples, skipped = [], 0
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        image_files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
        skipped += len(files) - len(image_files)
        if not image_files:
            raise DataError(f"image folder {root}: class folder {folder.name!r} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        examples += [Example(id=path.relative_to(root).as_posix(), fields={column: ImageRef.from_file(path)},
                             label=label_names.index(folder.name), n_choices=len(label_names))
                     for path in image_files]
    if skipped:
        log.info("image folder %s: skipped %d files that are not images", root, skipped)
    return TaskData(name="custom", split=opts.split or root.name, label_names=label_names, examples=examples,
                    template=template.rstrip(" ") if opts.strip_trailing_space else template,
                    source={"image_folder": root.name, "n_images": len(examples)},
                    strip_trailing_space=opts.strip_trailing_space, image_column=column)


def _image_ref(value: Any, base_dir: Path, where: str, n: int, column: str) -> ImageRef:
    """A record's image (a path relative to ``base_dir`` or absolute, or ``{"bytes", "path"}``)."""
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        data = value.get("bytes")
        if data:
            return ImageRef(f"{value.get('path') or f'record {n}'} ({where}, record {n})", lambda: data)
        value = value["path"]
    if isinstance(value, (str, Path)) and str(value).strip():
        path = base_dir / value
        if not path.is_file():
            raise DataError(f"{where}: record {n}: image file {path} does not exist (column {column!r}, paths "
                            f"relative to {base_dir})")
        return ImageRef.from_file(path)
    raise DataError(f"{where}: record {n} has no image in column {column!r} (found {type(value).__name__}: "
                    f"{str(value)[:40]!r}); give a path, or image bytes")


def build_image_task(records: list[dict[str, Any]], source: Source, opts: TaskOptions, *, column: str,
                     image_refs: list[ImageRef] | None = None, features: Any = None) -> TaskData:
    """Records with an image ``column`` (a path relative to ``source.base_dir``, or ``{"bytes",
    "path"}``), or records without it and their ``image_refs`` (a dataset's), as a task; labels as
    in :mod:`chiptuning.tasks.files`."""
    if not records:
        raise DataError(f"{source.where} holds no records")
    template = DEFAULT_IMAGE_PROMPT if opts.template is None else opts.template
    if opts.strip_trailing_space:
        template = template.rstrip(" ")
    needed = template_fields(template)
    if column in needed:
        raise DataError(f"--template uses the image column {column!r} as text; the image goes in by itself")
    label_names, classes = record_labels(records, opts, where=source.where, features=features,
                                         needed=needed | ({column} if image_refs is None else set()),
                                         options="--image-column / --template / --label-column")
    ids = example_ids(records, opts.id_column, source.where)
    examples = []
    for n, (record, label) in enumerate(zip(records, classes)):
        image = image_refs[n] if image_refs is not None else _image_ref(record[column], source.base_dir,
                                                                        source.where, n, column)
        fields = {k: v for k, v in record.items() if k != column}
        fields[column] = image
        examples.append(Example(id=ids[n], fields=fields, label=label, n_choices=len(label_names)))
    return checked_task(source.where, name="custom", split=source.split, label_names=label_names,
                        examples=examples, template=template, source=source.provenance,
                        strip_trailing_space=opts.strip_trailing_space, image_column=column)


def has_image_feature(features: Any, column: str) -> bool:
    """True when ``datasets.Features`` types ``column`` as an ``Image``."""
    return features is not None and column in features and type(features[column]).__name__ == "Image"


def dataset_images(dataset, column: str, where: str) -> tuple[list[dict[str, Any]], list[ImageRef], Any]:
    """The records of a ``datasets.Dataset`` without its image column, a lazy :class:`ImageRef`
    per row reading that column's bytes from the dataset's own (memory-mapped) files, and the
    features: no image is decoded, or held, before a batch needs it."""
    features = dataset.features
    if has_image_feature(features, column):
        # datasets is heavy (~1 s) and optional offline: only a dataset object brings us here
        from datasets import Image as ImageFeature
        dataset = dataset.cast_column(column, ImageFeature(decode=False))
    records = dataset.remove_columns([column]).to_list()
    image_refs = [ImageRef(f"{where} row {row}", partial(_row_bytes, dataset, column, where, row))
                  for row in range(len(records))]
    return records, image_refs, features


def _row_bytes(dataset, column: str, where: str, row: int) -> bytes:
    value = dataset[row][column]
    if isinstance(value, dict) and value.get("bytes"):
        return value["bytes"]
    if isinstance(value, dict) and value.get("path"):
        return Path(value["path"]).read_bytes()
    raise DataError(f"{where}: row {row} has no image in column {column!r}")


def _image_column_of(source: Source, image_column: str | None) -> str:
    """The image column of a dataset: ``image_column``, else an ``image`` column of type Image."""
    column, names = image_column or "image", source.dataset.column_names
    if column not in names:
        if image_column is None:  # neither text nor image options: the usual message
            raise DataError("give exactly one of --text-column or --template (or --image-column for image data); "
                            f"{source.where} has no 'image' column (columns: {', '.join(names)})")
        raise DataError(f"{source.where} has no image column {column!r} (columns: {', '.join(names)})")
    if image_column is None and not has_image_feature(source.dataset.features, column):
        raise DataError(f"{source.where}: column 'image' is not an Image feature; pass --image-column image to read "
                        "it as image paths, or --text-column / --template for text")
    return column


def load_image_data(data: Any, opts: TaskOptions) -> TaskData:
    """Image data: a folder, a file with an image column, a dataset (object or hub name) with one."""
    if opts.text_column is not None:
        raise DataError("--text-column does not apply to image data; the prompt asked about each image is "
                        "--template (default: the paper's question)")
    if opts.truncate_field not in (None, "none"):
        raise DataError("--truncate-field does not apply to image data (image prompts are never shortened)")
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        if opts.label_column != "label":
            raise DataError("--label-column does not apply to an image folder (its labels are the subfolder names)")
        return load_image_folder(data, opts)
    source = read_source(data, opts)
    if source.dataset is None:  # a local file: image paths are relative to its folder
        return build_image_task(source.records, source, opts, column=opts.image_column or "image",
                                features=source.features)
    column = _image_column_of(source, opts.image_column)
    records, image_refs, features = dataset_images(source.dataset, column, source.where)
    return build_image_task(records, source, opts, column=column, image_refs=image_refs, features=features)


__all__ = ["DEFAULT_IMAGE_PROMPT", "IMAGE_SUFFIXES", "ImageRef", "array_to_image", "as_image_input", "build_image_task",
           "dataset_images", "decode_bytes", "has_image_feature", "image_name", "image_size", "load_image_data",
           "load_image_folder", "open_image"]
