"""The registry of context modes: ``PolicyConfig.context_mode`` names one of ``CONTEXTS``.

A new mode subclasses ``ContextMode`` (``base.py``) in its own file and adds one line here.
"""

from modules.nets.contexts.base import ContextMode
from modules.nets.contexts.image import ImageEmbeddingContext
from modules.nets.contexts.lowdim import GoalContext, ObservationContext
from modules.nets.contexts.pointcloud import PointCloudContext

CONTEXTS: dict[str, type[ContextMode]] = {
    "goal": GoalContext,
    "observation": ObservationContext,
    "pointcloud": PointCloudContext,
    "image_embedding": ImageEmbeddingContext,
}

__all__ = ["CONTEXTS", "ContextMode"]
