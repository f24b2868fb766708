"""Native kernels where ggml lacks one: a C file each, built on install, with its ctypes loader."""
