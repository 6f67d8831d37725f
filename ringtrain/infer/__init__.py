"""Inference across a ring: one batch split over the members by measured speed
(:class:`RingInference`, :func:`infer`), and ensemble fusion of every member's own model
(:func:`fuse`)."""

from .fusion import Fusion, fuse
from .split import InferenceResult, RingInference, infer, measure_speed

__all__ = ["Fusion", "InferenceResult", "RingInference", "fuse", "infer", "measure_speed"]
