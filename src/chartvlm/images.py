"""Image handling shared by every stage: checking files, shrinking huge images, RGB conversion.

Pillow's decompression-bomb limits stay as Pillow sets them: an image above `Image.MAX_IMAGE_PIXELS`
(~89 M pixels, e.g. 10000x10000) opens with a DecompressionBombWarning and is shrunk by `fit_to_pixels`
right after decoding; one above twice that (~179 M) is refused, and `check_image` reports it as a bad
sample. Raise `PIL.Image.MAX_IMAGE_PIXELS` yourself only for files you trust.
"""

from __future__ import annotations

import io
import os

from chartvlm.errors import BadSampleError

# Qwen2-VL's smart_resize refuses an image whose long side is more than 200 times its short side.
MAX_ASPECT_RATIO = 200
# An image with more than SHRINK_ABOVE x max_pixels pixels is resized to the processor's target size right
# after decoding (its float copy would take >1 GB for 10000x10000). Smaller ones go to the processor as
# they are, so ordinary charts get exactly the processor's own resize, as a served model will.
SHRINK_ABOVE = 4


def to_rgb(image):
    """Charts arrive as RGBA, palette, grayscale, CMYK or 16-bit PNGs; the vision tower wants RGB."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent charts are drawn on white, as a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype("uint8")).convert("RGB")
    return image.convert("RGB")


def image_size(encoded: dict) -> tuple[int, int]:
    """(width, height) of an undecoded `datasets.Image` value ({"bytes", "path"}) from its header only."""
    from PIL import Image

    source = io.BytesIO(encoded["bytes"]) if encoded.get("bytes") else encoded["path"]
    with Image.open(source) as image:
        return image.size


def _check_shape(size: tuple[int, int], where: str) -> None:
    width, height = size
    if min(width, height) < 1:
        raise BadSampleError(where, f"the image is empty ({width}x{height} pixels)")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise BadSampleError(where, f"the image is {width}x{height} pixels: its long side is more than "
                                    f"{MAX_ASPECT_RATIO}x the short side, which the Qwen2-VL processor refuses; "
                                    "crop or pad it")


def check_image(encoded: dict | None, where: str) -> tuple[int, int]:
    """(width, height) of an undecoded `datasets.Image` value ({"bytes", "path"}) that the model can use.

    Raises BadSampleError if there is no image, the file is missing, not an image or damaged (PNG chunk
    checksums are verified, JPEGs decoded at 1/8 scale, other formats decoded), above Pillow's
    decompression-bomb limit, or shaped so that the processor would refuse it. No full-size decode for
    PNG or JPEG, so a pass over every row stays cheap.
    """
    from PIL import Image

    data, path = (encoded.get("bytes"), encoded.get("path")) if encoded else (None, None)
    if not data and not path:
        raise BadSampleError(where, "no image")
    if not data and not os.path.isfile(path):
        raise BadSampleError(where, f"image file not found: {path}")
    name = path or "the embedded image bytes"
    try:
        with Image.open(io.BytesIO(data) if data else path) as image:
            size = image.size
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
    except Image.DecompressionBombError as error:
        raise BadSampleError(where, f"{name}: {error} Downscale the image.") from None
    except Exception as error:  # noqa: BLE001 - Pillow signals a damaged file with many exception types
        raise BadSampleError(where, f"image cannot be read: {name} ({_describe(error)})") from None
    _check_shape(size, where)
    return size


def fit_to_pixels(image, max_pixels: int, factor: int = 28):
    """Shrink an image with more than SHRINK_ABOVE x max_pixels pixels to the size the Qwen2-VL processor
    would resize it to (so the processor has nothing left to do); return smaller images unchanged.

    A JPEG not yet decoded is decoded at a reduced scale. Palette and bilevel images are converted to RGB
    first, so that the shrink averages colours instead of picking palette entries.
    """
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    width, height = image.size
    if width * height <= SHRINK_ABOVE * max_pixels:
        return image
    target_height, target_width = smart_resize(height, width, factor=factor, min_pixels=factor * factor,
                                               max_pixels=max_pixels)
    image.draft(None, (target_width, target_height))
    if image.mode in ("1", "P", "PA"):
        image = to_rgb(image)
    return image.resize((target_width, target_height), Image.Resampling.BICUBIC, reducing_gap=3.0)


def model_image(value, processor, where: str = "image"):
    """One chart image as every stage hands it to the processor: decoded (a PIL image, a path, or a
    `datasets.Image` {"bytes", "path"} value), shrunk right after decoding when it is far above the
    processor's max_pixels (`fit_to_pixels`), and RGB (`to_rgb`).

    A missing, damaged or unusable image raises BadSampleError naming `where` (e.g. the row id).
    """
    from PIL import Image

    image_processor = processor.image_processor
    size = getattr(image_processor, "size", None) or {}
    max_pixels = size.get("longest_edge") or image_processor.max_pixels
    factor = image_processor.patch_size * image_processor.merge_size
    try:
        if isinstance(value, Image.Image):
            _check_shape(value.size, where)
            return to_rgb(fit_to_pixels(value, max_pixels, factor))
        if isinstance(value, (str, os.PathLike)):
            source = value
        elif isinstance(value, dict):
            if not value.get("bytes") and not value.get("path"):
                raise BadSampleError(where, "no image")
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        else:
            raise BadSampleError(where, f"expected a chart image, got {type(value).__name__}")
        with Image.open(source) as opened:
            _check_shape(opened.size, where)
            image = to_rgb(fit_to_pixels(opened, max_pixels, factor))
            image.load()
            return image.copy() if image is opened else image
    except BadSampleError:
        raise
    except FileNotFoundError as error:
        raise BadSampleError(where, f"image file not found: {error.filename}") from None
    except Exception as error:  # noqa: BLE001 - Pillow signals a damaged file with many exception types
        raise BadSampleError(where, f"image cannot be decoded ({_describe(error)})") from None


def _describe(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can read, or a damaged header"
    return f"{type(error).__name__}: {error}"
