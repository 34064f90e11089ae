"""Pure-function model families, weight loaders, tokenizer and the registry of known models."""
