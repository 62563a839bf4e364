"""l2v: LLM2Vec in plain PyTorch. See README.md for the layout."""


def __getattr__(name):
    # `from l2v import LLM2Vec` (upstream llm2vec's API), `from l2v import Encoder`, without making
    # `import l2v` load torch and the rest.
    if name == "LLM2Vec":
        from .llm2vec import LLM2Vec

        return LLM2Vec
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(f"module 'l2v' has no attribute {name!r}")
