"""Serving a trained model: torch.export / ONNX export of the embedding towers
(`multimodal.export.export`) and post-training int8 quantization for the CPU
(`multimodal.export.quantize`); the commands are in `multimodal.export.commands`."""
