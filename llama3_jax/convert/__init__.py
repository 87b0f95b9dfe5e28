"""Checkpoint conversion: Meta consolidated, Hugging Face safetensors and our Orbax format."""

from llama3_jax.convert.formats import FORMATS, Format, detect
from llama3_jax.convert.hf import load_hf, save_hf
from llama3_jax.convert.load import checkpoint_kind, checkpoint_or_preset, load_checkpoint
from llama3_jax.convert.meta import load_meta
from llama3_jax.convert.orbax_io import load_orbax, save_orbax
