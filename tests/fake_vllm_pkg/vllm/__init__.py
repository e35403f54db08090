"""An importable ``vllm`` for spawned worker processes in tests: tests/fake_vllm.py's fake module.

A worker imports ``vllm`` in a fresh interpreter, where ``sys.modules`` injection cannot reach; putting
this folder on ``sys.path`` (the child inherits it) lets it import the fake. The fake runs on the CPU,
so CUDA is reported present in that child.
"""

import sys

import torch

from tests.fake_vllm import make_module

torch.cuda.is_available = lambda: True
sys.modules[__name__] = make_module()
sys.modules[__name__ + ".platforms"] = sys.modules[__name__].platforms
