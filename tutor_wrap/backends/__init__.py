"""The tools tutor_wrap drives: Axolotl (config, training, merge, metrics plugin), llama.cpp, transformers, Ollama."""
