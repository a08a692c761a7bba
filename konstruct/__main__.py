from konstruct.cli import run

run()
