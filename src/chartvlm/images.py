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


# EXIF orientations 5-8 rotate by 90 or 270 degrees: the displayed image has width and height swapped.
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def displayed_size(image) -> tuple[int, int]:
    """(width, height) of an opened, possibly undecoded image as it is shown: after its EXIF orientation, which
    `open_image` (and datasets' decoding) applies. Read from the header; nothing is decoded."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the image is used as stored
        orientation = None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def open_image(source, where: str = "image"):
    """The one way chartvlm decodes an image file or its bytes, for every stage (training, evaluation, predict,
    serving): decoded whole, then turned upright by its EXIF orientation, as `datasets` does when it decodes an
    Image column, so a file and the same file inside a dataset give the same pixels.

    `source`: a path, bytes, or a `datasets.Image` value ({"bytes", "path"}). A missing, empty or unreadable
    image raises BadSampleError naming `where`."""
    from PIL import Image, ImageOps

    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is None and not path:
            raise BadSampleError(where, "no image")
        source = data if data is not None else path
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise BadSampleError(where, "empty image (0 bytes)")
        source = io.BytesIO(source)
    try:
        with Image.open(source) as opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            return opened.copy() if upright is opened else upright
    except FileNotFoundError as error:
        raise BadSampleError(where, f"image file not found: {error.filename}") from None
    except Exception as error:  # noqa: BLE001 - Pillow signals a damaged file with many exception types
        raise BadSampleError(where, f"image cannot be decoded ({_describe(error)})") from None


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

    The size is the displayed one (after the EXIF orientation `open_image` applies).
    Raises BadSampleError if there is no image, it is empty, the file is missing, not an image or damaged (PNG chunk
    checksums are verified, JPEGs decoded at 1/8 scale, other formats decoded), above Pillow's
    decompression-bomb limit, or shaped so that the processor would refuse it. No full-size decode for
    PNG or JPEG, so a pass over every row stays cheap.
    """
    from PIL import Image

    data, path = (encoded.get("bytes"), encoded.get("path")) if encoded else (None, None)
    if data is None and not path:
        raise BadSampleError(where, "no image")
    if data is not None and not data:
        raise BadSampleError(where, f"empty image (0 bytes{f' for {path}' if path else ''})")
    if data is None and not os.path.isfile(path):
        raise BadSampleError(where, f"image file not found: {path}")
    name = path or "the embedded image bytes"
    try:
        with Image.open(io.BytesIO(data) if data else path) as image:
            width, height = image.size
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(None, (max(1, width // 8), max(1, height // 8)))
                image.load()
        with Image.open(io.BytesIO(data) if data else path) as image:  # verify() leaves the image unusable
            size = displayed_size(image)
    except Image.DecompressionBombError as error:
        raise BadSampleError(where, f"{name}: {error} Downscale the image.") from None
    except Exception as error:  # noqa: BLE001 - Pillow signals a damaged file with many exception types
        raise BadSampleError(where, f"image cannot be read: {name} ({_describe(error)})") from None
    _check_shape(size, where)
    return size


def processed_size(image_processor, width: int, height: int) -> tuple[int, int]:
    """(width, height) the processor resizes an image to: each side a multiple of patch x merge, the area
    within its min/max pixels (Qwen2-VL's smart_resize, shared by every family)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = image_processor.patch_size * image_processor.merge_size
    size = getattr(image_processor, "size", None) or {}
    min_pixels = size.get("shortest_edge") or image_processor.min_pixels
    max_pixels = size.get("longest_edge") or image_processor.max_pixels
    new_height, new_width = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return new_width, new_height


def image_token_count(processor, width: int, height: int) -> int:
    """Language-model tokens of one image of (width, height): one per merged patch of its processed size, the
    count the processor expands <|image_pad|> to. The one place this arithmetic is written."""
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    new_width, new_height = processed_size(image_processor, width, height)
    return (new_width // factor) * (new_height // factor)


def fit_to_pixels(image, image_processor):
    """Shrink an image with more than SHRINK_ABOVE x the processor's max pixels to the size the processor would
    resize it to (so the processor has nothing left to do); return smaller images unchanged.

    Palette and bilevel images are converted to RGB first, so that the shrink averages colours instead of
    picking palette entries.
    """
    from PIL import Image

    width, height = image.size
    size = getattr(image_processor, "size", None) or {}
    if width * height <= SHRINK_ABOVE * (size.get("longest_edge") or image_processor.max_pixels):
        return image
    target = processed_size(image_processor, width, height)
    if image.mode in ("1", "P", "PA"):
        image = to_rgb(image)
    return image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)


def model_image(value, processor, where: str = "image", style=None):
    """One chart image as every stage hands it to the processor: decoded by `open_image` (unless it is already a
    PIL image, as `datasets` decodes it), shrunk right after decoding when it is far above the processor's
    max_pixels (`fit_to_pixels`), and RGB (`to_rgb`). A prompt style that reproduces another harness
    (prompts.PromptStyle) prepares it the harness's way instead (`harness_image`).

    A missing, damaged or unusable image raises BadSampleError naming `where` (e.g. the row id).
    """
    from PIL import Image

    if isinstance(value, (str, os.PathLike, bytes, bytearray, dict)):
        value = open_image(value, where)
    elif not isinstance(value, Image.Image):
        raise BadSampleError(where, f"expected a chart image, got {type(value).__name__}")
    _check_shape(value.size, where)
    try:
        if style is not None and (style.plain_rgb or style.pre_resize):
            return harness_image(value, processor.image_processor, style)
        return to_rgb(fit_to_pixels(value, processor.image_processor))
    except Exception as error:  # noqa: BLE001 - Pillow signals a damaged file with many exception types
        raise BadSampleError(where, f"image cannot be decoded ({_describe(error)})") from None


def harness_image(image, image_processor, style):
    """An image as lmms-eval / VLMEvalKit hand it to the processor: converted with PIL's convert("RGB") (lmms-eval
    drops transparency that way) or composited on white, then qwen_vl_utils.fetch_image's resize: each side to a
    multiple of patch x merge and the area into the style's (min, max) pixels, BICUBIC."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image = image.convert("RGB") if style.plain_rgb else to_rgb(image)
    if style.pre_resize:
        factor = image_processor.patch_size * image_processor.merge_size
        height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=style.pre_resize[0],
                                     max_pixels=style.pre_resize[1])
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


def _describe(error: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can read, or a damaged header"
    return f"{type(error).__name__}: {error}"
