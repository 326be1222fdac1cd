"""`python -m kubetune_operator`: the same as `kubetune-operator`."""

from kubetune_operator.cli import main

main()
