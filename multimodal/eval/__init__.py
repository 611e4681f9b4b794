"""Zero-shot, retrieval, captioning and VQA metrics, and the reports written from them."""
