"""lva: Llama 3.2 Vision on llama.cpp, offline, from the terminal."""

from assistant.runtime import MllamaModel, ModelError, load_model

__all__ = ["MllamaModel", "ModelError", "load_model"]
