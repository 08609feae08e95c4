"""Vision-language models: images through the model's own processor, and what identifies them.

In :class:`ImageInputs` (the image side of :mod:`chiptuning.encoding`) the processor resizes a
batch's images and expands each image placeholder into the image's tokens, so "the last token" is
the last real token of the expanded sequence, whatever the family.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from chiptuning.encoding import Batch, EncodedInputs
from chiptuning.errors import DataError
from chiptuning.io import canonical_hash
from chiptuning.registry import VISION_LANGUAGE, get_spec
from chiptuning.tasks import ImageRef, TaskData
from chiptuning.tasks.images import decode_bytes, image_name, image_size, open_image


class ImageInputs(EncodedInputs):
    """(prompt, image) pairs batched by a vision-language model's processor: chat-templated prompts
    with one image placeholder each; ``ImageRef``, PIL images or arrays, decoded a batch at a time;
    their ``sizes`` (width, height) when known (:func:`check_images`), else read from file headers."""

    def __init__(self, processor, prompts: Sequence[str], images: Sequence[Any],
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        if len(prompts) != len(images):
            raise DataError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image")
        self.processor = processor
        self.prompts = list(prompts)
        self.images = list(images)
        sizes = list(sizes) if sizes is not None else [image_size(img, i) for i, img in enumerate(self.images)]
        self.lengths = expanded_lengths(processor, self.prompts, sizes)

    def batch(self, rows: Sequence[int], device=None) -> Batch:
        rows = list(rows)
        decoded = [open_image(self.images[i], i) for i in rows]
        try:
            encoded = self._process([self.prompts[i] for i in rows], decoded)
        # The processor raises ValueError / TypeError / IndexError on an image it cannot take (too
        # small to resize, an extreme aspect ratio): find which one, and name it.
        except Exception as err:  # noqa: BLE001
            for i, image in zip(rows, decoded):
                try:
                    self._process([self.prompts[i]], [image])
                except Exception as one:  # noqa: BLE001
                    raise DataError(f"{image_name(self.images[i], i)}: the model's processor cannot take this "
                                    f"image ({type(one).__name__}: {(str(one).splitlines() or [''])[0]})") from None
            raise err
        tensors = {k: v if device is None else v.to(device) for k, v in encoded.items() if torch.is_tensor(v)}
        ids, mask = tensors.pop("input_ids"), tensors.pop("attention_mask")
        return Batch(rows, ids, mask, tensors)  # the rest: pixel_values and friends

    def _process(self, prompts: list[str], decoded: list[Image.Image]):
        return self.processor(text=prompts, images=[[image] for image in decoded], padding=True,
                              add_special_tokens=adds_special_tokens(self.processor, prompts[0]), return_tensors="pt")

    def token_ids(self, i: int) -> list[int]:
        batch = self.batch([i])
        return batch.input_ids[0][batch.attention_mask[0].bool()].tolist()


def adds_special_tokens(processor, prompt: str) -> bool:
    """Whether the tokenizer should add its special tokens to a chat-templated ``prompt``: not when
    the template already wrote the BOS token (the rule of ``processor.apply_chat_template``)."""
    bos = getattr(processor.tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def expanded_lengths(processor, prompts: Sequence[str], sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Tokens of each (prompt, image) after the processor expands the image placeholder. The
    expansion depends on the prompt and the image's size only (fixed for LLaVA, tiles for Idefics3),
    so a blank image of each distinct size goes through the processor once."""

    @functools.cache
    def length(prompt: str, size: tuple[int, int]) -> int:
        blank = Image.new("RGB", size)
        return len(processor(text=[prompt], images=[[blank]],
                             add_special_tokens=adds_special_tokens(processor, prompt))["input_ids"][0])

    return [length(prompt, (int(size[0]), int(size[1]))) for prompt, size in zip(prompts, sizes)]


def _check_one(image: Any, index: int) -> tuple[str, tuple[int, int]]:
    if isinstance(image, ImageRef):
        data = image.read()
        return hashlib.sha256(data).hexdigest(), decode_bytes(data, image.name).size
    decoded = open_image(image, index)  # a PIL image or an array held in memory: hash its pixels
    digest = hashlib.sha256(f"{decoded.mode}{decoded.size}".encode() + decoded.tobytes()).hexdigest()
    return digest, decoded.size


def check_images(images: Sequence[Any], workers: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(images_sha256, sizes): read and decode every image once (threads: decoding releases the GIL)
    before any is used, a bad one a DataError naming it; 16 hex characters of a hash over the images'
    bytes in order (what a cache's fingerprint covers), and each image's (width, height)."""
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(_check_one, images, range(len(images))))
    digest = hashlib.sha256(b"".join(bytes.fromhex(one) for one, _ in results))
    return digest.hexdigest()[:16], [size for _, size in results]


def processor_identity(processor) -> dict[str, Any]:
    """What a cache records of a processor: its class, its image processor's class, and a hash of
    its settings (image size, normalization, patch size, tokens per image...)."""
    return {"class": type(processor).__name__, "image_processor": type(processor.image_processor).__name__,
            "settings_sha256": canonical_hash(processor.to_dict(), 16)}


def check_modality(model_or_config, task: TaskData, model_name: str) -> None:
    """Refuse, naming the model, its type and the data, images for a text model and text for a
    vision-language model (DataError)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", model_or_config)
    is_vlm = get_spec(model_or_config).reads_images
    data = f"{task.name}/{task.split}"
    if is_vlm and task.image_column is None:
        raise DataError(f"model {model_name} is a vision-language model ({model_type}) and {data} holds text only; "
                        "give it image data (--data IMAGE_FOLDER, or --image-column COLUMN for a file or dataset)")
    if not is_vlm and task.image_column is not None:
        raise DataError(f"model {model_name} ({model_type}) reads text only and {data} holds images; give a "
                        f"vision-language model ({', '.join(sorted(VISION_LANGUAGE))}) or text data")


__all__ = ["ImageInputs", "adds_special_tokens", "check_images", "check_modality", "expanded_lengths",
           "processor_identity"]
