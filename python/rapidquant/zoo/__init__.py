"""Small models and real data that install offline (scikit-learn's digits), for the demo,
the benchmarks and tests. Nothing is downloaded."""
from rapidquant.zoo.digits import (
    DigitsMobileNet, DigitsResNet, accuracy, calibration_batches, digits_splits, pretrained, train,
)

__all__ = ["DigitsMobileNet", "DigitsResNet", "accuracy", "calibration_batches", "digits_splits", "pretrained",
           "train"]
