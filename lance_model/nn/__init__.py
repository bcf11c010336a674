"""lance_model/nn: the network and its weights: configuration, checkpoint reading, the MoT LLM, the ViT, the VAE,
attention, positions, the KV cache, the tokenizer, fp8 storage."""
