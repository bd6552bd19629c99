"""Data in: images, backbones, token alignment, the sources a trainer reads, streaming, and
the cache (and add-model) that turn images into a store."""
