"""llama3_jax: Meta's Llama 3 family in JAX/Flax."""

import setuptools

setuptools.setup(
    name="llama3_jax",
    version="0.1.0",
    description="A JAX/Flax reimplementation of Meta's Llama 3 family for TPU and GPU meshes",
    packages=setuptools.find_packages(include=["llama3_jax", "llama3_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "tiktoken",
        "chex",
        "absl-py",
        "numpy",
        "safetensors",
        "tokenizers",  # the Hugging Face tokenizer files of an exported checkpoint
        "matplotlib",  # training curves, needle-in-a-haystack heatmaps
        "tensorboardX",  # TensorBoard event files of the step metrics
        # Ships Meta's real Llama 3 tokenizer.model; also the reference tokenizer and chat format.
        "llama-models",
    ],
    extras_require={
        # References the tests compare against, and readers of Meta's .pth checkpoints.
        "torch": ["torch==2.13.0"],
        "test": [
            "torch==2.13.0",
            "transformers",
            "fairscale",
            "pytest",
            "pyyaml",
            "tensorboard",  # reads the event files back
            "wandb",
            "lm-eval",
            "accelerate",  # lm-eval's hf model
        ],
        # lm-evaluation-harness (llama3_jax/eval/harness.py, experiments/evaluate.py).
        "eval": ["lm-eval"],
        # Weights & Biases logging (--wandb_project).
        "wandb": ["wandb"],
        # libtpu matching the installed jax: compiles for TPU topologies on any host (dry_run.py
        # --topology); an unmatched newer libtpu fails with XLA RET_CHECK errors.
        "tpu-aot": ["jax[tpu]>=0.10.2,<0.11"],
    },
)
