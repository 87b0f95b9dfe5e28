"""Checkpoint conversion: Meta consolidated, Hugging Face safetensors and our Orbax format."""
