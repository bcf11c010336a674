"""lance_model/tasks: what each task does: requests and settings, packing and templates, the CFG-branch engine, the
sampler and guidance, generation, understanding and text generation, encoders, the conversation context."""
