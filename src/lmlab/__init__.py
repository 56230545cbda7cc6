"""lmlab: ten recent LLM research methods as one package and CLI.

Importing ``lmlab`` imports neither torch nor transformers; each command imports what it needs.
"""

__version__ = "0.1.0"
