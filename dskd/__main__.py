"""``python -m dskd``: what the launchers run on every rank."""

from dskd.cli import run_and_exit

run_and_exit()
