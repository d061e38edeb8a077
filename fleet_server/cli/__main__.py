from fleet_server.cli.main import main

main()
