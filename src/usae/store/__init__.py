"""The activation store: reading, writing, merging, importing, statistics. Knows nothing of
images, backbones or the SAE."""
