"""decode_image over every sensor's files: formats, bands, depths, orientation, bad bytes."""

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from earthgpt_jax.data.images import (MAX_IMAGE_PIXELS, EmptyImageError, ImageDecodeError,
                                      ImageTooLargeError, NotAnImageError, TooFewBandsError,
                                      decode_image, pad_to_square, square_and_resize)


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pil_bytes(arr_or_img, fmt, **kwargs):
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _tiff_bytes(arr, **kwargs):
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kwargs)
    return buf.getvalue()


def _grey3(grey):
    return np.repeat(grey[..., None], 3, axis=-1)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_rgb_formats_round_trip(fmt):
    arr = _rgb()
    out = decode_image(_pil_bytes(arr, fmt), f"x.{fmt.lower()}")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, arr)


def test_jpeg_matches_pillow():
    data = _pil_bytes(_rgb(), "JPEG", quality=90)
    np.testing.assert_array_equal(decode_image(data, "x.jpg"),
                                  np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_single_band_infrared_replicated():
    grey = _rgb()[..., 0]
    for data in (_pil_bytes(grey, "PNG"), _tiff_bytes(grey), _pil_bytes(grey, "JPEG")):
        out = decode_image(data, "ir")
        assert out.shape == (20, 30, 3)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(decode_image(_tiff_bytes(grey), "ir.tif"), _grey3(grey))


def _sar_amplitude():
    """Sea clutter spread over 1000..2000, a few ships at 60000 (a heavy-tailed SAR scene)."""
    rng = np.random.default_rng(3)
    amp = rng.uniform(1000, 2000, (64, 64)).astype(np.uint16)
    amp[10:12, 20:24] = 60000
    return amp


def test_sixteen_bit_sar_percentile_stretch():
    amp = _sar_amplitude()
    out = decode_image(_tiff_bytes(amp), "sar.tif")
    assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
    grey = out[..., 0]
    assert (grey[10:12, 20:24] == 255).all()  # the ships saturate white
    sea = np.delete(grey.ravel(), np.flatnonzero(amp.ravel() == 60000))
    # The clutter keeps its texture over most of the range; a min-max stretch would squeeze it
    # into 1000..2000 / 60000 * 255 = 4..8, i.e. five grey levels.
    assert len(np.unique(sea)) > 200 and sea.std() > 50
    # Order is kept: a brighter sample never maps darker.
    order = np.argsort(amp.ravel(), kind="stable")
    assert (np.diff(grey.ravel()[order].astype(int)) >= 0).all()
    lo, hi = np.percentile(amp, (0.5, 99.5))
    assert (grey[amp <= lo] == 0).all() and (grey[amp >= hi] == 255).all()


def test_sixteen_bit_png_and_tiff_agree():
    amp = _sar_amplitude()
    png = _pil_bytes(Image.fromarray(amp), "PNG")
    np.testing.assert_array_equal(decode_image(png, "sar.png"),
                                  decode_image(_tiff_bytes(amp), "sar.tif"))


def test_float_and_complex_sar():
    amp = _sar_amplitude().astype(np.float32)
    want = decode_image(_tiff_bytes(_sar_amplitude()), "u16")
    np.testing.assert_array_equal(decode_image(_tiff_bytes(amp), "f32"), want)
    phase = np.exp(1j * np.random.default_rng(0).uniform(0, 6.28, amp.shape))
    np.testing.assert_array_equal(
        decode_image(_tiff_bytes((amp * phase).astype(np.complex64)), "slc"), want)
    amp[0, :5] = np.nan
    out = decode_image(_tiff_bytes(amp), "nan.tif")
    assert (out[0, :5] == 0).all()


def test_multiband_tiff_first_three_bands_either_layout():
    rng = np.random.default_rng(1)
    bands = rng.integers(0, 256, (5, 16, 24), dtype=np.uint8)
    planar = _tiff_bytes(bands, photometric="minisblack", planarconfig="separate")
    contig = _tiff_bytes(bands.transpose(1, 2, 0), photometric="minisblack",
                         planarconfig="contig")
    want = bands[:3].transpose(1, 2, 0)
    np.testing.assert_array_equal(decode_image(planar, "ms_planar.tif"), want)
    np.testing.assert_array_equal(decode_image(contig, "ms_contig.tif"), want)
    # 16-bit multispectral: the kept bands share one stretch, so their relative colour survives.
    deep = (bands.astype(np.uint16) * 40)
    deep[3:] = 65535  # bright NIR-like bands beyond the third must not enter the stretch
    out = decode_image(_tiff_bytes(deep, photometric="minisblack", planarconfig="separate"), "d")
    lo, hi = np.percentile(deep[:3].astype(float), (0.5, 99.5))
    expect = np.clip(np.round((deep[:3] - lo) / (hi - lo) * 255), 0, 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(out, expect.astype(np.uint8))


def test_n_band_model_keeps_n_bands_with_one_stretch():
    """input_bands=4: the first four bands, stretched jointly (band ratios survive), the first
    three equal to the 3-band decode for 8-bit files."""
    bands = np.random.default_rng(3).integers(0, 256, (5, 16, 24), dtype=np.uint8)
    data = _tiff_bytes(bands, photometric="minisblack", planarconfig="separate")
    four = decode_image(data, "ms.tif", bands=4)
    np.testing.assert_array_equal(four, bands[:4].transpose(1, 2, 0))
    np.testing.assert_array_equal(four[..., :3], decode_image(data, "ms.tif"))
    deep = bands.astype(np.uint16) * 40
    deep[3] = 65535 - deep[3]  # a bright NIR band: it enters the stretch with the others
    out = decode_image(_tiff_bytes(deep, photometric="minisblack", planarconfig="separate"),
                       "deep.tif", bands=4)
    lo, hi = np.percentile(deep[:4].astype(float), (0.5, 99.5))
    expect = np.clip(np.round((deep[:4] - lo) / (hi - lo) * 255), 0, 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(out, expect.astype(np.uint8))


def test_n_band_model_widens_grey_and_refuses_rgb_naming_the_file():
    grey = np.random.default_rng(4).integers(0, 256, (8, 8), dtype=np.uint8)
    out = decode_image(_tiff_bytes(grey), "sar.tif", bands=4)
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 4, axis=-1))
    with pytest.raises(TooFewBandsError, match="rgb.png has 3 bands, fewer than the 4") as err:
        decode_image(_pil_bytes(_rgb(), "PNG"), "rgb.png", bands=4)
    assert err.value.kind == "too_few_bands" and isinstance(err.value, ImageDecodeError)
    # One band for a 1-band model, from any file: the first.
    np.testing.assert_array_equal(decode_image(_pil_bytes(_rgb(), "PNG"), "x", bands=1),
                                  _rgb()[..., :1])


def test_resize_of_n_bands_is_the_rgb_resize_per_band():
    """Pillow would read a 4th band as alpha; band by band gives what the RGB path gives."""
    rng = np.random.default_rng(5)
    for _ in range(20):
        h, w, size = (int(v) for v in rng.integers(3, 70, 3))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        nir = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
        out = square_and_resize(np.dstack([rgb, nir]), size)
        assert out.shape == (size, size, 5)
        np.testing.assert_array_equal(out[..., :3], square_and_resize(rgb, size))
        np.testing.assert_array_equal(out[..., 3:5], square_and_resize(nir[..., [0, 1, 1]],
                                                                       size)[..., :2])


def test_two_band_tiff_uses_first_band():
    bands = np.random.default_rng(2).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    out = decode_image(_tiff_bytes(bands, photometric="minisblack", planarconfig="separate"), "")
    np.testing.assert_array_equal(out, _grey3(bands[0]))


def test_multipage_tiff_first_page():
    pages = np.stack([_rgb(seed=5), _rgb(seed=6)])
    np.testing.assert_array_equal(decode_image(_tiff_bytes(pages, photometric="rgb"), "p.tif"),
                                  pages[0])


def _exif(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_applied_like_pillow(orientation):
    arr = _rgb(12, 20)
    png = _pil_bytes(arr, "PNG", exif=_exif(orientation))
    with Image.open(io.BytesIO(png)) as img:
        img.load()
        assert img.getexif().get(0x0112) == orientation
        want = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    assert want.shape[:2] == ((20, 12) if orientation >= 5 else (12, 20))
    np.testing.assert_array_equal(decode_image(png, "o.png"), want)
    tiff = _tiff_bytes(arr, photometric="rgb", extratags=[(274, "H", 1, orientation, False)])
    np.testing.assert_array_equal(decode_image(tiff, "o.tif"), want)


def test_palette_and_alpha_over_black():
    arr = _rgb(10, 10)
    pal = Image.fromarray(arr).quantize(16)
    np.testing.assert_array_equal(decode_image(_pil_bytes(pal, "PNG"), "p.png"),
                                  np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    out = decode_image(_pil_bytes(pal, "PNG", transparency=0), "pt.png")
    idx = np.asarray(pal)
    assert (out[idx == 0] == 0).all()
    np.testing.assert_array_equal(out[idx != 0], np.asarray(pal.convert("RGB"))[idx != 0])
    rgba = np.dstack([arr, np.zeros((10, 10), np.uint8)])
    rgba[:5, :, 3] = 255
    rgba[5:, :5, 3] = 128
    out = decode_image(_pil_bytes(rgba, "PNG"), "a.png")
    np.testing.assert_array_equal(out[:5], arr[:5])
    assert (out[5:, 5:] == 0).all()
    np.testing.assert_array_equal(out[5:, :5], np.round(arr[5:, :5] * (128 / 255)))
    tif = decode_image(_tiff_bytes(rgba, photometric="rgb", extrasamples=[2]), "a.tif")
    np.testing.assert_array_equal(tif, out)


def _png_header(width, height):
    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(
            ">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_refused_before_decoding():
    bomb = _png_header(100_000, 100_000)  # 30 GB of RGB from a 100-byte file
    assert 100_000 ** 2 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match="bomb.png.*exceeds"):
        decode_image(bomb, "bomb.png")
    bomb = _png_header(25_000, 25_000)  # over our limit, under Pillow's error threshold
    with pytest.raises(ImageTooLargeError, match="bomb.png: 25000 x 25000 = .* exceeds"):
        decode_image(bomb, "bomb.png")
    with pytest.raises(ImageTooLargeError, match="big.tif"):
        decode_image(_tiff_bytes(_rgb(20, 30), photometric="rgb"), "big.tif", max_pixels=599)
    assert decode_image(_tiff_bytes(_rgb(20, 30), photometric="rgb"), "ok", max_pixels=600
                        ).shape == (20, 30, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_truncated_image_names_the_file(fmt):
    data = _pil_bytes(_rgb(64, 64), fmt) if fmt != "TIFF" else _tiff_bytes(_rgb(64, 64))
    with pytest.raises(ImageDecodeError, match=f"cannot decode image cut.{fmt}") as err:
        decode_image(data[:len(data) // 2], f"cut.{fmt}")
    assert err.value.kind == "undecodable_image"


def test_empty_and_non_image_bytes():
    with pytest.raises(EmptyImageError, match="zero.jpg.*0 bytes"):
        decode_image(b"", "zero.jpg")
    with pytest.raises(NotAnImageError, match="page.jpg.*not an image") as err:
        decode_image(b"<html><body>404 Not Found</body></html>", "page.jpg")
    assert err.value.kind == "not_an_image" and isinstance(err.value, ValueError)


def test_pad_and_resize_geometry():
    tall = _rgb(10, 6)
    square = pad_to_square(tall)
    assert square.shape == (10, 10, 3)
    np.testing.assert_array_equal(square[:, 2:8], tall)
    assert (square[:, :2] == 0).all() and (square[:, 8:] == 0).all()
    assert square_and_resize(tall, 4).shape == (4, 4, 3)
