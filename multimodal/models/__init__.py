"""Composite vision-language models (CLIP, captioner, VQA): plain nn.Modules, no Lightning."""
