"""mad: M-adapter video action recognition from a cached frozen open_clip ViT."""

__version__ = "0.1.0"
