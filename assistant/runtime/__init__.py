"""Running mllama on llama.cpp: model loading, the cross-attention hook, sampling."""

from assistant.runtime.model import MllamaModel, ModelError, load_model
from models.mllama.vision import EncodeCancelled

__all__ = ["EncodeCancelled", "MllamaModel", "ModelError", "load_model"]
