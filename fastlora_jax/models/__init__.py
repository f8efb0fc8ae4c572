"""Model families: the shared decoder (decoder.py), one file per family (a config translation over it, or,
for a truly different architecture such as Qwen-VL's vision tower, code of its own), and the registry from
Hugging Face architectures to families (registry.py)."""
