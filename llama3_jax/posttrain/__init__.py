"""Post-training as in the Llama 3 paper: chat data with target masks, SFT, reward model, DPO,
rejection sampling and model averaging."""
