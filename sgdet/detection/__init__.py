"""Detection: Faster R-CNN (torchvision) over compressed SG backbones. The backbone registry and
backbones (``backbones/``), the detector builder (``faster_rcnn``), COCO datasets (``datasets``)
and evaluation (``evaluation``), the detection trainer on the engine's one Trainer (``trainer``),
its config schema (``config``), the commands of ``tools/train_net.py`` (``commands``), the
detectron2 bridge (``backbones/detectron2_compat``), the shapes generator and the demo.

``import sgdet`` does not import this package; importing it registers the built-in backbones and
the ``faster_rcnn`` architecture (``sgdet.load`` imports it on demand for a saved detector)."""
from .backbones import BACKBONE_REGISTRY, Backbone, build_backbone, registered_backbones
from .faster_rcnn import build_faster_rcnn, detector_counts

__all__ = ["BACKBONE_REGISTRY", "Backbone", "build_backbone", "registered_backbones",
           "build_faster_rcnn", "detector_counts"]
