"""The `sar_ships` TFDS builder (configs ssdd, hrsid); importing this package registers it."""

from tfds_builders.sar_ships.sar_ships import SarShips, SarShipsConfig

__all__ = ["SarShips", "SarShipsConfig"]
