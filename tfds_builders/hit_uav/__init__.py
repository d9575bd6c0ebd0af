"""The `hit_uav` TFDS builder; importing this package registers it with TFDS."""

from tfds_builders.hit_uav.hit_uav import HitUav

__all__ = ["HitUav"]
