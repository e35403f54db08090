"""Guard examples, their loaders and the HarmAug DataModule."""
