from devpass.cli import main

main()
