"""Cross-modal attention: fusion blocks and encoders."""
