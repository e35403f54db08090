"""Evaluation beyond the training metrics: augmentation diversity, test reports."""
