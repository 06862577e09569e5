"""In-process local models on llama.cpp (llama-cpp-python)."""
