"""harmaug-pl: distil a large LLM safety guard into a small encoder with HarmAug, in Lightning."""

__version__ = "0.1.0"
