"""dllama engine: model files, tokenizers, compute graph, generation and the command line."""
