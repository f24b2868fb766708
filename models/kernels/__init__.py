"""lva's CPU kernels where ggml's are slow: C files built on install into one library (lva.h says how they
are laid out), its ctypes loader (library.py), the ops as graph nodes (ops.py), and the paths they run,
as values (paths.py)."""
