"""WebDataset shards in; decoded, aspect-bucketed batches and precomputed caches out."""
