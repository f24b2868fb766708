"""lva: Llama 3.2 Vision on llama.cpp, offline, from the terminal."""
