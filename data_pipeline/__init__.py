"""WebDataset shards in; decoded, aspect-bucketed batches and precomputed caches out."""


def __getattr__(name: str):
    # Lazy, so that importing data_pipeline.config (the run-file schema) stays light.
    if name == "build_loader":
        from data_pipeline.loader import build_loader

        return build_loader
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
