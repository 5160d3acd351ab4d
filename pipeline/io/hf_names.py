"""The file names of a Hugging Face checkpoint directory, which sources read and outputs write.

Kept apart from the safetensors code so that naming a file never imports torch.
"""

INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's weight_map
SINGLE_NAME = "model.safetensors"  # an unsharded checkpoint
CONFIG_NAME = "config.json"
