from services.tokenizer.server import main

main()
