"""``python -m rankopt``: the ``rankopt`` command, the way ``torchrun -m rankopt train ...`` starts it."""

from rankopt.cli import main

main()
