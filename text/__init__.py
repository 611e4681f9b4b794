"""Text towers: tokenizers, encoder / decoder / encoder-decoder models, generation, heads."""
