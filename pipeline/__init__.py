"""texture-pipeline: WebDataset shards, a conditional texture GAN and a U-Net segmenter, tracked in MLflow."""
