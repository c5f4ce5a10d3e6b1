"""Images in chat messages: read each ``image_url`` part within the limits, run the model's image processor, and
expand each image's one placeholder token (what the chat template writes) into the tokens its features fill.

Only base64 ``data:`` URLs are read unless ALLOW_IMAGE_URLS lets the server fetch http(s) URLs; every image is
checked for its size in bytes and pixels before it is decoded, and a request holds at most MAX_IMAGES_PER_REQUEST.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import urllib.request
from dataclasses import dataclass
from typing import Any, Optional

from serve.engine.types import ImageInputs

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ImageError(ValueError):
    """An image a request sent cannot be used: the message says why (a 400)."""


@dataclass(frozen=True)
class ImageLimits:
    """MAX_IMAGES_PER_REQUEST, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, ALLOW_IMAGE_URLS and IMAGE_FETCH_TIMEOUT_S."""

    max_images: int = 8
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    allow_urls: bool = False
    fetch_timeout_s: float = 10.0


def read_image_url(url: str, limits: ImageLimits) -> bytes:
    """The bytes an ``image_url`` names: a base64 data URL, or an http(s) URL where the operator allows fetching."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.endswith(";base64") or not header[5:].startswith("image/"):
            raise ImageError("a data URL must be data:image/<type>;base64,<data>")
        if len(payload) > limits.max_bytes * 4 // 3 + 4:
            raise ImageError(f"the image is larger than MAX_IMAGE_BYTES ({limits.max_bytes} bytes)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data URL's base64 does not decode: {exc}") from exc
    if url.startswith(("http://", "https://")):
        if not limits.allow_urls:
            raise ImageError("image URLs are not fetched by this server (ALLOW_IMAGE_URLS=false): send a data URL")
        return _fetch(url, limits)
    raise ImageError("an image_url must be a data: URL (or http(s) where the server allows fetching)")


def _fetch(url: str, limits: ImageLimits) -> bytes:
    """GET ``url`` within IMAGE_FETCH_TIMEOUT_S, reading at most MAX_IMAGE_BYTES."""
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as response:  # noqa: S310 - http(s) only
            data = response.read(limits.max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise ImageError(f"the image could not be fetched from {url}: {exc}") from exc
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is larger than MAX_IMAGE_BYTES ({limits.max_bytes} bytes)")
    return data


def open_image(data: bytes, limits: ImageLimits) -> Any:
    """The image as RGB pixels, its size checked before its pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is larger than MAX_IMAGE_BYTES ({limits.max_bytes} bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > limits.max_pixels:
            raise ImageError(f"the image has {width}x{height} pixels, more than MAX_IMAGE_PIXELS ({limits.max_pixels})")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ImageError(f"the image cannot be decoded ({', '.join(IMAGE_FORMATS)} are read): {exc}") from exc


def digest(data: bytes) -> str:
    """What names an image in prefix-cache keys."""
    return hashlib.sha256(data).hexdigest()


def image_prompt_of(tokenizer: Any) -> Any:
    """How the model takes images, as the loader attached it to the front's tokenizer (serve.loading.vision's
    ImagePrompt; None: the model takes no images)."""
    build = getattr(tokenizer, "serve_image_prompt", None)
    return build() if build is not None else None


def image_limits(settings: Any) -> ImageLimits:
    """The image settings as limits."""
    return ImageLimits(
        settings.max_images_per_request,
        settings.max_image_bytes,
        settings.max_image_pixels,
        settings.allow_image_urls,
        settings.image_fetch_timeout_s,
    )


def prompt_with_images(
    tokenizer: Any, prompt_ids: list[int], urls: list[str], limits: ImageLimits
) -> tuple[list[int], Optional[ImageInputs]]:
    """A chat prompt's ids with its images' placeholders expanded, and the images for the engine (ids unchanged and
    None without images). BadRequest (400) for images this model or these limits do not take."""
    from serve.errors import BadRequest

    if not urls:
        return prompt_ids, None
    prompt = taking_images(tokenizer, urls, limits)
    try:
        images = [read_image_url(url, limits) for url in urls]
        pictures = [open_image(data, limits) for data in images]
        return prompt.inputs(prompt_ids, pictures, tuple(digest(data) for data in images))
    except ValueError as exc:  # ImageError, or the model's processor refusing an image
        raise BadRequest(f"messages: {exc}", "messages") from exc


def taking_images(tokenizer: Any, urls: list[str], limits: ImageLimits) -> Any:
    """The model's ImagePrompt for ``urls``; BadRequest (400) for a text-only model or too many images (checked
    before the chat template renders the parts)."""
    from serve.errors import BadRequest

    prompt = image_prompt_of(tokenizer)
    if prompt is None:
        raise BadRequest("messages: this model takes no images (image parts need a vision-language model)", "messages")
    if len(urls) > limits.max_images:
        message = f"messages: {len(urls)} images, more than MAX_IMAGES_PER_REQUEST ({limits.max_images})"
        raise BadRequest(message, "messages")
    return prompt
