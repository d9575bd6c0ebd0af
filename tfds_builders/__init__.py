"""TFDS builders of this project; importing the package registers every one of them."""

from tfds_builders import mmrs1m  # noqa: F401
from tfds_builders import dior_rsvg  # noqa: F401
from tfds_builders import nwpu_captions  # noqa: F401
from tfds_builders import rsvqa_hr  # noqa: F401
from tfds_builders import crsvqa  # noqa: F401
from tfds_builders import scene_folders  # noqa: F401
from tfds_builders import sar_ships  # noqa: F401
from tfds_builders import hit_uav  # noqa: F401
from tfds_builders import dota  # noqa: F401
from tfds_builders import hrsc2016  # noqa: F401
from tfds_builders.mmrs1m import tfds_compat

tfds_compat.quiet_fd_limit_notice()  # every preparation goes through this package
