"""``python -m harmaug_pl`` runs the same CLI as ``harmaug`` and ``lightning``."""

from harmaug_pl.cli import console_main

if __name__ == "__main__":
    console_main()
