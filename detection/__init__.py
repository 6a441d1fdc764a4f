"""Detection pipeline: Faster R-CNN (torchvision) with compressed SG backbones, trained and
evaluated on the suite's one Trainer. Entry point: ``python tools/train_net.py --config-file
configs/faster_rcnn_sg_r50.yaml``; backbones, datasets and the evaluator live in ``sgdet``."""
