"""Commands that are more than one training run: the teacher cache, the memory plan. The
CLI (``dskd.cli``) parses arguments and calls these or the training layer."""
