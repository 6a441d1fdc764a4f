"""Kept for the README's old name: the detectron2 bridge is
sgdet.detection.backbones.detectron2_compat (importing either registers the backbones once)."""
from ..detection.backbones.detectron2_compat import *  # noqa: F401,F403
from ..detection.backbones.detectron2_compat import add_sg_config  # noqa: F401
