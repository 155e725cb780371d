"""genctr-rec: GenCTR generative pre-training and CTR fine-tuning on sharded TorchRec tables."""

__version__ = "0.12.4"
