"""Running mllama on llama.cpp: model loading, the cross-attention hook, sampling."""

from assistant.runtime.model import MllamaModel, ModelError, load_model

__all__ = ["MllamaModel", "ModelError", "load_model"]
