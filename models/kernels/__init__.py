"""Native kernels where ggml's are slow: one C file (cpu.c), built on install, and its ctypes loader."""
