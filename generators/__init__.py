"""Every generative model of dreamlab behind one interface (see `generators.base`)."""
import dreamlab  # noqa: F401  (first: it sets the OpenMP wait policy before generators.base imports torch)
from generators.base import (
    Generator,
    Model,
    TrainConfig,
    list_generators,
    list_models,
    make_generator,
    make_model,
    register,
)

__all__ = ["Generator", "Model", "TrainConfig", "list_generators", "list_models", "make_generator", "make_model",
           "register"]
