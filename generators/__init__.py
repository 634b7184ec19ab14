"""Every generative model of dreamlab behind one interface (see `generators.base`)."""
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

__all__ = ["Generator", "Model", "TrainConfig", "list_generators", "list_models", "make_generator", "make_model", "register"]
