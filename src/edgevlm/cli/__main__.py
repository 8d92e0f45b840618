"""`python -m edgevlm.cli ...`, as torchrun and accelerate launch start the command line."""

from edgevlm.cli import main

main()
