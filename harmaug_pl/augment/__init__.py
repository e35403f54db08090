"""HarmAug data augmentation: generate instructions, answer them, label everything with the teacher.

Import from the submodules (``cache``, ``generator``, ``responder``, ``pipeline``): the cache stays
importable without torch, which keeps writer subprocesses and tools light.
"""
