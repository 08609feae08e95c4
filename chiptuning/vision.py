"""Vision-language models: images through the model's own processor, and what identifies them.

* :class:`ImageInputs` is the image side of the one encoder (:mod:`chiptuning.encoding`): each
  example is a prompt (the processor's chat template around the image placeholder, see
  :func:`chiptuning.tasks.image_chat_prompt`) and an image; a batch decodes its images and lets the
  processor resize them and expand each placeholder into the image's tokens, so "the last token"
  is simply the last real token of the expanded sequence, whatever the family. Lengths for
  planning batches come from the images' sizes (a blank image of each size through the processor,
  once per size), so no image is decoded before its batch.
* :func:`check_images` reads and decodes every image once before an extraction, so a missing,
  unreadable or corrupt image fails in one line naming the file before anything is computed, and
  returns the sha256 of the image bytes the cache's fingerprint covers.
* :func:`processor_identity` is what a cache records of the processor (classes and settings).
* :func:`check_modality` refuses image data for a text model and text data for a vision-language
  model, naming both.
"""

from __future__ import annotations

import hashlib
import logging
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

log = logging.getLogger(__name__)


class ImageInputs(EncodedInputs):
    """(prompt, image) pairs for a vision-language model, batched by its processor.

    Args:
        processor: the model's processor (:func:`chiptuning.models.load_processor`); its
            tokenizer's padding side is the batches'.
        prompts: one rendered prompt per image, with one image placeholder each.
        images: :class:`~chiptuning.tasks.ImageRef`, PIL images or arrays.
        sizes: (width, height) of each image when already known (:func:`check_images`); else read
            from each file's header.

    Raises:
        DataError: a missing or unreadable image (named), prompts and images of different counts.
    """

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
        images = [open_image(self.images[i], i) for i in rows]  # decoded here, one batch at a time
        try:
            encoded = self._process([self.prompts[i] for i in rows], images)
        except DataError:
            raise
        # The processor raises ValueError / TypeError / IndexError on an image it cannot take (too
        # small to resize, an extreme aspect ratio): find which one, and name it.
        except Exception as err:  # noqa: BLE001
            for i, image in zip(rows, images):
                try:
                    self._process([self.prompts[i]], [image])
                except Exception as one:  # noqa: BLE001
                    raise DataError(f"{image_name(self.images[i], i)}: the model's processor cannot take this "
                                    f"image ({type(one).__name__}: {str(one).splitlines()[0] if str(one) else ''})"
                                    ) from None
            raise err
        ids, mask = encoded.pop("input_ids"), encoded.pop("attention_mask")
        extra = {k: v.to(device) if device is not None else v for k, v in encoded.items() if torch.is_tensor(v)}
        return Batch(rows, ids.to(device) if device is not None else ids,
                     mask.to(device) if device is not None else mask, extra)

    def _process(self, prompts: list[str], images: list[Image.Image]):
        return self.processor(text=prompts, images=[[image] for image in images], padding=True,
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
    """Tokens of each (prompt, image) after the processor expands the image placeholder.

    The expansion depends on the prompt and the image's size only (fixed for LLaVA, tiles for
    Idefics3), so a blank image of each distinct size goes through the processor once.
    """
    memo: dict[tuple[str, tuple[int, int]], int] = {}
    lengths = []
    for prompt, size in zip(prompts, sizes):
        key = (prompt, (int(size[0]), int(size[1])))
        if key not in memo:
            blank = Image.new("RGB", key[1])
            ids = processor(text=[prompt], images=[[blank]],
                            add_special_tokens=adds_special_tokens(processor, prompt))["input_ids"][0]
            memo[key] = len(ids)
        lengths.append(memo[key])
    return lengths


def _check_one(image: Any, index: int) -> tuple[str, tuple[int, int]]:
    if isinstance(image, ImageRef):
        data = image.read()
        return hashlib.sha256(data).hexdigest(), decode_bytes(data, image.name).size
    decoded = open_image(image, index)  # a PIL image or an array held in memory: hash its pixels
    digest = hashlib.sha256(f"{decoded.mode}{decoded.size}".encode() + decoded.tobytes()).hexdigest()
    return digest, decoded.size


def check_images(images: Sequence[Any], workers: int | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Read and decode every image once (threads: decoding releases the GIL), before any is used.

    Returns:
        (images_sha256, sizes): a hash over every image's bytes in order (16 hex characters, what
        a cache's fingerprint covers) and each image's (width, height).

    Raises:
        DataError: the first missing, unreadable or undecodable image, named.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_check_one, images, range(len(images))))
    digest = hashlib.sha256()
    for one, _ in results:
        digest.update(bytes.fromhex(one))
    return digest.hexdigest()[:16], [size for _, size in results]


def processor_identity(processor) -> dict[str, Any]:
    """What a cache records of a processor: its class, its image processor's class, and a hash of
    its settings (image size, normalization, patch size, tokens per image...)."""
    return {
        "class": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "settings_sha256": canonical_hash(processor.to_dict(), 16),
    }


def check_modality(model_or_config, task: TaskData, model_name: str) -> None:
    """Refuse data the model cannot read: images for a text model, text for a vision-language model.

    Raises:
        DataError: naming the model, its type and the data.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", model_or_config)
    images = get_spec(model_or_config).images
    data = f"{task.name}/{task.split}"
    if images and task.image_column is None:
        raise DataError(
            f"model {model_name} is a vision-language model ({model_type}) and {data} holds text only; give it "
            "image data (--data IMAGE_FOLDER, or --image-column COLUMN for a file or dataset)"
        )
    if not images and task.image_column is not None:
        raise DataError(
            f"model {model_name} ({model_type}) reads text only and {data} holds images; give a vision-language "
            f"model ({', '.join(sorted(VISION_LANGUAGE))}) or text data"
        )


__all__ = ["ImageInputs", "adds_special_tokens", "check_images", "check_modality", "expanded_lengths",
           "processor_identity"]
