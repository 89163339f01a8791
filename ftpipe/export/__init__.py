"""Export for local inference: the merged model as GGUF files (llama.cpp, Ollama) and Ollama Modelfiles.

gguf.py       HF folder → GGUF (tensors, hyper-parameters, vocabulary, chat template, ftpipe.* metadata)
modelfile.py  the training template as an Ollama Modelfile (TEMPLATE, SYSTEM, PARAMETER stop)
"""
