"""The label contract shared by map, pack, train and evaluation."""

# Label of a token that carries no loss (prompt tokens, the first token of each document); the value
# PyTorch's cross_entropy and transformers ignore by default.
IGNORE_INDEX = -100
