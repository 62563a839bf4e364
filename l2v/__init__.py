"""l2v: LLM2Vec in plain PyTorch. See README.md for the layout."""
