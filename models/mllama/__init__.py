"""Llama 3.2 Vision (HF `model_type: mllama`): hyperparameters, GGUF keys and weight names."""
