from loratools.cli.main import main

main()
