"""Tools beside the pipeline's stages: benchmarks and the data they generate."""
