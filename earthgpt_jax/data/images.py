"""Image decoding for every sensor, and the geometry the boxes rely on: centre-pad, then resize.

`decode_image` turns the encoded bytes the TFDS builders store into uint8 [H, W, 3] (or
[H, W, N] for a model of N input bands, `bands=N`), whatever the sensor wrote: JPEG, PNG, BMP
(and GIF/WebP/JPEG 2000 through Pillow), and TIFF through `tifffile`, including 16-bit or float
single-band SAR, single-band infrared and multi-band products. The rules, in the order they apply:

- Size guard: the pixel count in the header is checked before any pixel is decoded; above
  `max_pixels` the image is refused (`ImageTooLargeError`), so a decompression bomb never
  allocates.
- Bands: 1 band is replicated to 3 (SAR and thermal infrared are grey); 2 bands (grey + alpha,
  or a dual-polarisation SAR pair) -> the first band replicated; 3 or more -> the first three, in
  file order, taken as R, G, B (a multispectral product stored B, G, R, NIR should be reordered
  before building; the band order is not in the file in any standard way). A palette is
  expanded; alpha is composited over black, the colour `pad_to_square` pads with, so a
  transparent border looks like padding.
- Bands for a model of N input bands (config.model.input_bands; `bands=N`): the first N bands
  in file order; an image with fewer is grey below three bands (its first band replicated to
  N, as above) and otherwise refused (`TooFewBandsError`, naming the file): an RGB image has no
  NIR to give a 4-band model, and a made-up band would teach the band adapter a lie. Each
  source's band order is the builder's to record (the synthetic one: `synthetic.Source.bands`).
- Depth: 8-bit samples are kept. Anything else (16-bit or 32-bit integer, float, complex SAR as
  its magnitude) is stretched linearly between its 0.5th and 99.5th percentiles, jointly over
  the kept bands (all N of them for an N-band model: one stretch keeps the ratios between bands,
  the spectral signature the band adapter learns from), then clipped to 0..255. Why this
  rule: SAR amplitude is heavy-tailed (a few corner reflectors and ships are 100x brighter than
  the sea), so a min-max stretch would crush the clutter into a handful of grey levels, and a
  fixed rule (dB with fixed limits) needs calibration constants that differ per sensor and
  product. The percentile stretch keeps the clutter's texture and only saturates the brightest
  0.5 %, which are the targets and stay white. It is per image, so a scene's absolute
  brightness is not preserved; MMRS-1M's own SAR sources are already 8-bit JPEG/PNG and are not
  stretched at all.
- Orientation: the EXIF (JPEG/PNG/WebP) or TIFF Orientation tag is applied, so the pixels are in
  display order, the order annotators saw and the one boxes refer to.
- Multi-page TIFF: the first page.

MMRS-1M box coordinates are fractions of the centre-padded square (see `boxes.pad_offsets`), so
the model must see exactly that square; any other resize would shift every box.
"""

from __future__ import annotations

import io
import warnings
from typing import Callable

import numpy as np
from PIL import Image

from earthgpt_jax.data.boxes import pad_offsets

# Largest image accepted, in pixels. DOTA-v2, the largest-scene source of MMRS-1M, reportedly
# reaches about 20,000 px on a side; a 24k x 24k RGB image decodes to 1.7 GB, which a host can
# still afford, while a bomb (e.g. 100k x 100k from a few KB of PNG) would need 30 GB.
MAX_IMAGE_PIXELS = 24_000 * 24_000
# Pillow's own guard (warning above it, error above twice it) agrees with ours.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# The stretch that maps high-dynamic-range samples to 8 bits (see the module docstring).
STRETCH_PERCENTILES = (0.5, 99.5)

_EXIF_ORIENTATION = 0x0112  # the same tag number (274) in EXIF and in TIFF


class ImageDecodeError(ValueError):
    """An image that cannot be turned into pixels; the message names the image."""

    kind = "undecodable_image"


class EmptyImageError(ImageDecodeError):
    kind = "empty_image"


class NotAnImageError(ImageDecodeError):
    kind = "not_an_image"


class TooFewBandsError(ImageDecodeError):
    kind = "too_few_bands"


class ImageTooLargeError(ImageDecodeError):
    kind = "image_too_large"
    size: tuple[int, int] | None = None  # (width, height) from the header, when it was read


_MAGIC = {"jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "bmp": (b"BM",),
          "tiff": (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),  # classic and BigTIFF
          "gif": (b"GIF87a", b"GIF89a"),
          "jpeg2000": (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")}


def sniff_format(data: bytes) -> str | None:
    """Container format from the magic bytes, or None when the bytes are no known image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((fmt for fmt, magics in _MAGIC.items() if data.startswith(magics)), None)


def decode_image(data: bytes, name: str = "<bytes>", *, max_pixels: int = MAX_IMAGE_PIXELS,
                 bands: int = 3) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, bands] in display orientation (rules: module
    docstring); `bands` is the model's config.model.input_bands. Raises an `ImageDecodeError`
    (a ValueError) naming `name`; its subclass and `kind` say why: empty file, not an image,
    too many pixels, too few bands, or broken/truncated data."""
    if not data:
        raise EmptyImageError(f"cannot decode image {name}: empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise NotAnImageError(
            f"cannot decode image {name}: not an image file (starts with {data[:12]!r}); "
            "expected JPEG, PNG, BMP or TIFF")
    try:
        read = _read_tiff if fmt == "tiff" else _read_pillow
        pixels, orientation = read(data, name, max_pixels)
        return _orient(to_bands_uint8(pixels, bands, name), orientation)
    except ImageDecodeError:
        raise
    except Exception as e:  # decoders raise many types for broken files; name the image always
        raise ImageDecodeError(f"cannot decode image {name}: its {fmt.upper()} data is "
                               f"truncated or corrupt ({type(e).__name__}: {e})") from e


def _check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        error = ImageTooLargeError(
            f"cannot decode image {name}: {width} x {height} = {width * height} pixels exceeds "
            f"the limit of {max_pixels} (a decompression-bomb guard; raise max_pixels if the "
            "image is genuine)")
        error.size = (width, height)
        raise error


# --------------------------------------------------------------------------------------------
# Readers: each returns the samples as [H, W, C] (any dtype) and the orientation code.


def _read_pillow(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # over twice Pillow's own limit
            raise ImageTooLargeError(
                f"cannot decode image {name}: {e} (a decompression-bomb guard; if the image is "
                "genuine, raise max_pixels and PIL.Image.MAX_IMAGE_PIXELS)") from e
    with img:
        _check_pixels(img.width, img.height, name, max_pixels)
        img.load()  # decodes every pixel: truncated data fails here, not later
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        return _pillow_samples(img), orientation


def _pillow_samples(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGB", "L") or mode.startswith("I") or mode == "F":  # I, F: 16/32-bit, float
        arr = np.asarray(img)
    elif mode == "1":
        arr = np.asarray(img.convert("L"))
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
        return _composite_over_black(arr) if has_alpha else arr
    elif mode in ("RGBA", "LA"):
        return _composite_over_black(np.asarray(img))
    elif mode in ("RGBa", "La"):  # alpha already multiplied in: drop it
        arr = np.asarray(img)[..., :-1]
    else:  # CMYK, YCbCr, LAB, HSV: Pillow knows their conversion to RGB
        arr = np.asarray(img.convert("RGB"))
    return arr if arr.ndim == 3 else arr[..., None]


def _composite_over_black(samples: np.ndarray) -> np.ndarray:
    """[H, W, C+1] with straight (unassociated) alpha last -> [H, W, C] over black."""
    colour = samples[..., :-1].astype(np.float64)
    alpha = samples[..., -1:].astype(np.float64)
    full = 1.0 if samples.dtype.kind == "f" else float(np.iinfo(samples.dtype).max)
    return np.round(colour * (alpha / full)).astype(samples.dtype)


def _read_tiff(data: bytes, name: str, max_pixels: int) -> tuple[np.ndarray, int]:
    import tifffile  # imported here: only TIFF sources need it

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.pages:
            raise ImageDecodeError(f"cannot decode image {name}: TIFF holds no image")
        page = tif.pages.first
        _check_pixels(int(page.imagewidth), int(page.imagelength), name, max_pixels)
        tag = page.tags.get(_EXIF_ORIENTATION)
        orientation = int(tag.value) if tag is not None else 1
        try:
            arr = page.asarray()
        except Exception as tiff_error:
            # tifffile lacks some codecs (e.g. JPEG-in-TIFF without imagecodecs); Pillow has them.
            try:
                return _read_pillow(data, name, max_pixels)
            except ImageDecodeError:
                raise
            except Exception:
                raise tiff_error from None
        arr = _samples_last(arr, page.axes)
        photometric = int(page.photometric)
        if photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            # Colour map entries are 16-bit; keep the high byte.
            arr = (page.colormap[:, arr[..., 0]] >> 8).astype(np.uint8).transpose(1, 2, 0)
        elif photometric == tifffile.PHOTOMETRIC.MINISWHITE and arr.dtype.kind == "u":
            arr = np.iinfo(arr.dtype).max - arr
        extras = tuple(int(e) for e in (page.extrasamples or ()))
        if extras and extras[-1] in (1, 2) and arr.shape[-1] in (2, 4):
            # 1: associated (pre-multiplied) alpha, just dropped; 2: straight alpha, composited.
            arr = _composite_over_black(arr) if extras[-1] == 2 else arr[..., :-1]
        return arr, orientation


def _samples_last(arr: np.ndarray, axes: str) -> np.ndarray:
    """tifffile's array with axes like 'YX', 'YXS', 'SYX' or 'IYXS' -> [H, W, C]."""
    for axis in reversed(range(len(axes))):  # keep the first of any extra axis (page, depth)
        if axes[axis] not in "YXS":
            arr = np.take(arr, 0, axis=axis)
            axes = axes[:axis] + axes[axis + 1:]
    if "S" not in axes:
        arr, axes = arr[..., None], axes + "S"
    return np.transpose(arr, [axes.index(a) for a in "YXS"])


# --------------------------------------------------------------------------------------------
# Samples -> uint8 RGB, then display orientation.


def kept_bands(count: int, bands: int = 3, name: str = "<image>") -> int:
    """How many leading bands of `count` a model of `bands` input bands keeps (module
    docstring): `bands` when the image has them, else 1 (grey, replicated) below 3; a 3+ band
    image short of `bands` is a TooFewBandsError naming `name`. Windowed readers
    (earthgpt_jax/scene) read only these."""
    if count >= bands:
        return bands
    if count < 3:
        return 1
    raise TooFewBandsError(
        f"image {name} has {count} bands, fewer than the {bands} the model reads "
        f"(config.model.input_bands={bands}); only 1- and 2-band (grey) images are widened")


def to_bands_uint8(samples: np.ndarray, bands: int = 3, name: str = "<image>") -> np.ndarray:
    """[H, W, C] samples of any depth -> uint8 [H, W, bands]: training's band choice and
    stretch (TooFewBandsError naming `name` when C falls short, `kept_bands`)."""
    # Bands are chosen before the stretch, so dropped bands do not shift it and a single band
    # is stretched once, then replicated.
    kept = to_uint8(samples[..., :kept_bands(samples.shape[-1], bands, name)])
    if kept.shape[-1] != bands:
        kept = np.repeat(kept, bands, axis=-1)
    return np.ascontiguousarray(kept)


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """8-bit samples unchanged; any other depth stretched to 0..255 (module docstring)."""
    if samples.dtype == np.uint8:
        return samples
    if samples.dtype == bool:
        return samples.astype(np.uint8) * 255
    values = np.abs(samples) if np.iscomplexobj(samples) else samples
    finite = values
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(samples.shape, np.uint8)
    lo, hi = np.percentile(finite, STRETCH_PERCENTILES)
    scaled = (values.astype(np.float64) - lo) / max(hi - lo, 1e-12) * 255.0
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


# Orientation code (EXIF/TIFF tag 274) -> the transform that brings stored rows into display
# order; the same table as Pillow's ImageOps.exif_transpose, written for [H, W, C] arrays.
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                        # mirrored left-right
    3: lambda a: a[::-1, ::-1],                     # rotated 180
    4: lambda a: a[::-1],                           # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),              # transposed
    6: lambda a: np.rot90(a, -1),                   # needs 90 degrees clockwise
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # transversed
    8: lambda a: np.rot90(a, 1),                    # needs 90 degrees counter-clockwise
}


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    # An out-of-range tag is written by some cameras; like Pillow, treat it as "as stored".
    return np.ascontiguousarray(_ORIENT.get(orientation, _ORIENT[1])(image))


# --------------------------------------------------------------------------------------------
# Geometry


def pad_to_square(image: np.ndarray, fill: int = 0) -> np.ndarray:
    """Centre-pads [H, W, C] to [S, S, C] with the release's offsets (short side floor'd)."""
    height, width = image.shape[:2]
    pad_x, pad_y, side = pad_offsets(width, height)
    out = np.full((side, side, image.shape[2]), fill, image.dtype)
    out[pad_y:pad_y + height, pad_x:pad_x + width] = image
    return out


def square_and_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The model's view of an image: padded square resized to `size` x `size` (bilinear), any
    number of bands."""
    square = pad_to_square(image)
    if square.shape[0] == size:
        return square
    if square.shape[2] == 3:
        return np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR), np.uint8)
    # Band by band: Pillow would take a 4th band for alpha (RGBA resizes premultiplied) and has
    # no mode for more; per band it computes what its RGB resize does (tests/test_bands.py).
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(square[..., b]))
                                .resize((size, size), Image.BILINEAR), np.uint8)
                     for b in range(square.shape[2])], axis=-1)
