from glmtune.cli import main

main()
