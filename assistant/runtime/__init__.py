"""Running mllama on llama.cpp: model loading, the cross-attention hook, sampling, several answers at once."""

from assistant.runtime.errors import ModelError
from assistant.runtime.model import MllamaModel, load_model
from models.mllama.vision import EncodeCancelled

__all__ = ["EncodeCancelled", "MllamaModel", "ModelError", "load_model"]
