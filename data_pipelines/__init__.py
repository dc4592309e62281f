"""grain data pipelines for eqx-ring (synthetic video-text data, packing, layouts): arriving in later releases."""
