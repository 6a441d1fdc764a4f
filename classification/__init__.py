"""classification: training, compressing and evaluating classifiers with SG-CNN (LeNet-5 on
MNIST-style data, DenseNet121 on CIFAR, ResNet50/DenseNet201 on ImageNet), all through the one
Trainer in classification/engine.py."""
