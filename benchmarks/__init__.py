"""Speed and quality benchmarks for harmaug-pl (measured here, not in the tests).

Each benchmark is one command that prints a markdown table and writes it, with the raw numbers as
JSON, to ``benchmarks/results/`` (git-ignored: results may quote generated harmful text). See
``benchmarks/README.md``.
"""
