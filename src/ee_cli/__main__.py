from ee_cli.cli import main

main()
