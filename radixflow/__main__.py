from radixflow.cli import main

main()
