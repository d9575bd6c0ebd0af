"""A scene on disk, read one window at a time: the tile grid, training's band choice and
stretch per tile, nodata masked, the georeference, and a small overview.

Nothing here holds the whole raster: a tile is read with a rasterio window (GDAL reads only the
blocks it touches), and the overview is a decimated read whose output is at most
`OVERVIEW_SIDE` pixels a side.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from earthgpt_jax.data.images import TooFewBandsError, kept_bands, to_bands_uint8

OVERVIEW_SIDE = 1024
# GDAL's block cache, in MB. Its default is 5 % of the host's memory, which on a large host
# would let RSS grow with the raster; a row of overlapping tiles re-reads the blocks of the row
# above, so the cache needs only a band of blocks as wide as the scene (30 MB for 20,000 px
# of 3 x 16-bit bands in 256 px tiles).
GDAL_CACHE_MB = 256


class SceneError(ValueError):
    """A scene that cannot be read or tiled as asked; the message is one line for the user."""


@dataclasses.dataclass(frozen=True)
class Tile:
    index: int
    col: int  # scene pixel of the tile's top-left corner
    row: int
    width: int
    height: int

    @property
    def window(self) -> list[int]:
        return [self.col, self.row, self.width, self.height]


def _starts(length: int, tile: int, stride: int) -> list[int]:
    # The last tile is moved back to end at the border, so every tile is full-size and every
    # tile is seen at one scale (a short edge tile would be centre-padded, then resized).
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    """Row-major tiles of `tile` pixels overlapping by `overlap` (a scene side shorter than a
    tile gets one tile as long as that side)."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise SceneError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile} "
                         f"overlap={overlap}")
    stride = tile - overlap
    cells = [(c, r) for r in _starts(height, tile, stride) for c in _starts(width, tile, stride)]
    return [Tile(i, c, r, min(tile, width), min(tile, height)) for i, (c, r) in enumerate(cells)]


class SceneReader:
    """An open scene: size, bands, georeference; `read(tile)` gives what the model sees."""

    def __init__(self, path: str, input_bands: int = 3):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
        if not os.path.exists(path):
            raise SceneError(f"scene not found: {path}")
        self._env = rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)
        self._env.__enter__()  # until close(): reads need the setting too
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.ds = rasterio.open(path)
        except RasterioIOError as e:
            self._env.__exit__(None, None, None)
            raise SceneError(f"cannot read scene {path}: {str(e).splitlines()[0]}") from None
        self.path = path
        self.width, self.height = self.ds.width, self.ds.height
        # Training's band choice (data/images.py) for a model of `input_bands` bands, read as
        # such: a 13-band scene reads 3 for an RGB model, 4 for a 4-band one. The overview is a
        # picture for people: the RGB model's bands, whatever the model reads.
        self.input_bands = input_bands
        try:
            self.bands = list(range(1, kept_bands(self.ds.count, input_bands, path) + 1))
        except TooFewBandsError as e:
            self.close()
            raise SceneError(str(e)) from None
        self._display_bands = list(range(1, kept_bands(self.ds.count) + 1))
        # No CRS (a PNG, a JPEG, a TIFF without GeoTIFF tags): coordinates stay in pixels.
        self.crs = self.ds.crs if self.ds.crs else None
        self.transform = self.ds.transform

    def close(self) -> None:
        self.ds.close()
        self._env.__exit__(None, None, None)

    def __enter__(self) -> "SceneReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _samples(self, bands: list[int], out_bands: int,
                 **read_args) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [h, w, out_bands] as training decodes for a model of `out_bands` bands,
        valid [h, w]) of one windowed or decimated read of `bands`."""
        from rasterio.errors import RasterioIOError
        try:
            data = self.ds.read(bands, masked=True, **read_args)
        except RasterioIOError as e:
            raise SceneError(f"cannot read scene {self.path}: "
                             f"{str(e).splitlines()[0]}") from None
        valid = ~np.ma.getmaskarray(data).any(axis=0)
        samples = np.moveaxis(np.ma.getdata(data), 0, -1)
        if samples.dtype != np.uint8:
            # Nodata as NaN: the stretch's percentiles skip it and it maps to 0 (images.to_uint8).
            samples = samples.astype(np.float64)
            samples[~valid] = np.nan
        image = to_bands_uint8(samples, out_bands, self.path)
        image[~valid] = 0  # black, the colour training's centre padding uses
        return image, valid

    def read(self, tile: Tile) -> tuple[np.ndarray, float]:
        """(uint8 [h, w, input_bands] of the tile, the fraction of its pixels that hold data)."""
        from rasterio.windows import Window
        window = Window(tile.col, tile.row, tile.width, tile.height)
        image, valid = self._samples(self.bands, self.input_bands, window=window)
        return image, float(valid.mean())

    def overview(self) -> tuple[np.ndarray, float]:
        """(uint8 [h, w, 3] picture of the whole scene at most OVERVIEW_SIDE a side, scene
        pixels per overview pixel)."""
        scale = max(1.0, max(self.width, self.height) / OVERVIEW_SIDE)
        shape = (len(self._display_bands), max(1, round(self.height / scale)),
                 max(1, round(self.width / scale)))
        image, _ = self._samples(self._display_bands, 3, out_shape=shape)
        return image, self.width / shape[2]
