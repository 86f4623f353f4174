"""skinlesion: train, evaluate, explain and serve dermatoscopic skin-lesion classifiers."""

__version__ = "0.1.0"
