"""Webdataset shard writing and reading, datamodules and the bundled demo dataset."""
