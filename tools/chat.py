"""Chat with any result of a run (`llmft chat`); the code is llmft/tools/chat.py."""

from llmft.tools.chat import main

if __name__ == "__main__":
    main()
