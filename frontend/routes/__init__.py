"""HTTP routes: one module per endpoint family, each a thin router over the pipeline."""
