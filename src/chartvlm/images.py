"""Image handling shared by every stage: RGB conversion and cheap size reads."""

from __future__ import annotations

import io


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
