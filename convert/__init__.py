"""Checkpoint -> GGUF: read a Hugging Face Llama 3.2 Vision checkpoint, write a text and a vision GGUF."""
