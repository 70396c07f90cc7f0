"""Real early exit: run a trained multi-exit network stage by stage, each sample stopping at
the first exit whose confidence reaches its threshold (``DynamicPredictor``), and
``l2w-infer``, which runs it over a split or a folder of images with timings against the
full network.

    predictor = DynamicPredictor.from_checkpoint("RUN/checkpoints/last.pt", point=0.75)
    out = predictor.predict(images)  # out.classes, out.exits (0-based), out.confidence
"""

from .predictor import DynamicPredictor, OperatingPoint, Predictions, PredictorError, choose_point

__all__ = ["DynamicPredictor", "OperatingPoint", "Predictions", "PredictorError", "choose_point"]
