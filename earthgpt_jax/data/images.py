"""Image decoding and the geometry the boxes rely on: centre-pad to a square, then resize.

MMRS-1M box coordinates are fractions of the centre-padded square (see `boxes.pad_offsets`), so
the model must see exactly that square; any other resize would shift every box.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from earthgpt_jax.data.boxes import pad_offsets

# Refuse absurd images before PIL allocates them (decompression bombs): 16k x 16k pixels.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3]; single-band SAR/IR are replicated to 3 channels."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I", "F"):
                # 16-bit/float single band (SAR amplitude): stretch to 8 bits by its own range.
                arr = np.asarray(img, np.float64)
                lo, hi = np.percentile(arr, (0.5, 99.5))
                arr = np.clip((arr - lo) / max(hi - lo, 1e-9), 0, 1) * 255
                img = Image.fromarray(arr.astype(np.uint8))
            rgb = img.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files; name the image either way
        raise ValueError(f"cannot decode image {name}: {e}") from e
    return np.asarray(rgb, np.uint8)


def pad_to_square(image: np.ndarray, fill: int = 0) -> np.ndarray:
    """Centre-pads [H, W, C] to [S, S, C] with the release's offsets (short side floor'd)."""
    height, width = image.shape[:2]
    pad_x, pad_y, side = pad_offsets(width, height)
    out = np.full((side, side, image.shape[2]), fill, image.dtype)
    out[pad_y:pad_y + height, pad_x:pad_x + width] = image
    return out


def square_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The model's view of an image: padded square resized to `size` x `size` (bilinear)."""
    square = pad_to_square(image)
    if square.shape[0] == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR), np.uint8)
