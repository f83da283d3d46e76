from soundnet.ingest.cli import main

main()
