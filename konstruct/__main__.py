from konstruct.cli import main

main()
