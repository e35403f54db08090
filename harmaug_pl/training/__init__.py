"""Training the student: the distillation LightningModule, its callbacks, checkpoints, progress."""
