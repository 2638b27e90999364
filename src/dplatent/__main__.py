from dplatent.cli import main

main()
