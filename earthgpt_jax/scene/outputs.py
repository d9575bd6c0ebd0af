"""What a scene run leaves: GeoJSON in WGS84 (RFC 7946) at --out, the same features in the
scene's own CRS beside it (`<out stem>.scene_crs.geojson`), and a PNG overview with the boxes.

A scene without a CRS gets one GeoJSON at --out in scene pixels (x right, y down from the
top-left corner of the raster), and the collection says so in its `coordinates` member.
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from earthgpt_jax.scene.merge import Detection
from earthgpt_jax.scene.raster import SceneReader

PIXELS = "scene pixels (x right, y down from the raster's top-left corner; no georeference)"


def _ring(points) -> list[list[float]]:
    ring = [[float(x), float(y)] for x, y in points]
    return ring + ring[:1]


def _features(rings, props) -> list[dict]:
    return [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_ring(r)]},
             "properties": p} for r, p in zip(rings, props)]


def _collection(features, reader: SceneReader, task: str, coordinates: str, **extra) -> dict:
    return {"type": "FeatureCollection", "coordinates": coordinates,
            "scene": os.path.abspath(reader.path), "size": [reader.width, reader.height],
            "task": task, **extra, "features": features}


def _write(path: str, collection: dict) -> None:
    tmp = path + ".tmp"  # a reader never sees half a file
    with open(tmp, "w") as f:
        json.dump(collection, f, indent=1)
    os.replace(tmp, path)


def scene_crs_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".scene_crs.geojson"


def overview_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".png"


def write_geojson(reader: SceneReader, detections: list[Detection], out: str, task: str
                  ) -> list[str]:
    """The GeoJSON files of `detections` (paths written, --out first)."""
    props = [{"class": d.label, "tile": d.tile, "answer": d.answer,
              "pixel_corners": [round(v, 3) for v in d.corners]} for d in detections]
    pixel_rings = [list(zip(d.corners[0::2], d.corners[1::2])) for d in detections]
    if reader.crs is None:
        _write(out, _collection(_features(pixel_rings, props), reader, task, PIXELS))
        return [out]
    from pyproj import Transformer
    # Pixel edges, not centres: the affine maps (0, 0) to the raster's outer corner.
    map_rings = [[reader.transform @ xy for xy in r] for r in pixel_rings]
    to_wgs84 = Transformer.from_crs(reader.crs.to_wkt(), "EPSG:4326", always_xy=True)
    lonlat_rings = [list(zip(*to_wgs84.transform(*zip(*r)))) if r else [] for r in map_rings]
    epsg = reader.crs.to_epsg()
    crs_name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else reader.crs.to_wkt()
    _write(out, _collection(_features(lonlat_rings, props), reader, task,
                            "EPSG:4326 (longitude, latitude)",
                            scene_crs=reader.crs.to_string()))
    # The 2008 GeoJSON `crs` member: GIS tools read it; RFC 7946 readers take --out instead.
    native_path = scene_crs_path(out)
    _write(native_path, _collection(_features(map_rings, props), reader, task,
                                    reader.crs.to_string(),
                                    crs={"type": "name", "properties": {"name": crs_name}}))
    return [out, native_path]


def write_overview(reader: SceneReader, detections: list[Detection], path: str) -> str:
    """The scene at most raster.OVERVIEW_SIDE a side, each box outlined in red."""
    image, scale = reader.overview()
    picture = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(picture)
    for d in detections:
        points = [(x / scale, y / scale) for x, y in zip(d.corners[0::2], d.corners[1::2])]
        draw.polygon(points, outline=(255, 40, 40), width=max(1, picture.width // 400))
    picture.save(path)
    return path
