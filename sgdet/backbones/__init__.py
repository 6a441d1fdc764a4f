"""Kept for the README's old name ``sgdet.backbones.detectron2_compat``: the detection backbones
now live in sgdet.detection.backbones. Importing this loads the detection code."""
from ..detection.backbones import *  # noqa: F401,F403
