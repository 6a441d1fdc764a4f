"""classification: training, compressing and evaluating classifiers with SG-CNN (LeNet-5 on
MNIST-style data now; CIFAR and ImageNet set-ups build on the same trainer)."""
