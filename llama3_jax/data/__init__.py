"""Pretraining data: document sources, the embedded corpus, packing, and the grain pipeline."""

from llama3_jax.data.corpus import embedded_corpus, stdlib_files
from llama3_jax.data.packing import PackIterDataset
from llama3_jax.data.pipeline import MixIterDataset, held_out_mask, make_pipeline
from llama3_jax.data.sources import (
  ArrayRecords,
  DocumentSource,
  JsonLines,
  MalformedCounter,
  TextFiles,
  expand_pattern,
  open_source,
)
