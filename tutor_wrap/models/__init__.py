"""Model facts: architectures known offline, what a model folder holds, GGUF quantization types."""
