from multimodal.cli import main

main()
