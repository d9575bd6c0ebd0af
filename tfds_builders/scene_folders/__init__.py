"""The `scene_folders` TFDS builder (configs clrs, nasc_tg2, nwpu_resisc45, ucm, aid); importing
this package registers it with TFDS."""

from tfds_builders.scene_folders.scene_folders import SceneConfig, SceneFolders, scene_class_name

__all__ = ["SceneFolders", "SceneConfig", "scene_class_name"]
