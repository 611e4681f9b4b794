"""Training and evaluation of vision, text and vision-language transformers."""

__version__ = "0.1.0"
