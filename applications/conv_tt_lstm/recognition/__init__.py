"""Early activity recognition: name the class of a clip from its first 25 %, 50 %, ... of frames.

* :mod:`.model`: per-step classifiers (logits at every step, step ``t`` from frames
  ``0..t``): a small strided-conv frame encoder, stacked Conv-TT-LSTM / ConvLSTM /
  higher-order ConvLSTM cells of :mod:`tt_conv.recurrent` and a pooled linear head
  (:class:`RecurrentClassifier`), or a causal 3D-CNN baseline (:class:`Conv3dClassifier`).
* The data come from :func:`~..data.factory.build_clip_source`: the walls-touched task
  (:mod:`~..data.walls`, built from the Moving MNIST generator, whose label is decided
  only by watching the whole clip), KTH actions and Something-Something V2.
* :mod:`.evaluate`: top-1 / top-5 accuracy by fraction seen, markdown table, PNG.
* :mod:`.task`: the task plugged into the training skeleton
  (:mod:`applications.conv_tt_lstm.training.skeleton`): :func:`train_recognizer`, and
  :func:`evaluate_checkpoint` for a saved classifier.

Command line: ``python -m applications.conv_tt_lstm recognize --preset quick`` (and
``recognize evaluate --run runs/recognize-quick``).
"""

from .config import PRESETS, RecognitionConfig, apply_overrides, preset
from .evaluate import accuracy_by_fraction, accuracy_table, frames_seen, plot_accuracy_by_fraction
from .model import (
    ClassifierConfig,
    Conv3dClassifier,
    RecurrentClassifier,
    build_classifier,
    load_classifier,
)
from .task import RecognitionTask, evaluate_checkpoint, train_recognizer

__all__ = [
    "PRESETS", "RecognitionConfig", "apply_overrides", "preset",
    "accuracy_by_fraction", "accuracy_table", "frames_seen", "plot_accuracy_by_fraction",
    "ClassifierConfig", "Conv3dClassifier", "RecurrentClassifier", "build_classifier",
    "RecognitionTask", "evaluate_checkpoint", "load_classifier", "train_recognizer",
]
