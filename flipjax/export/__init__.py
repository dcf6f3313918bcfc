"""Export to, and import from, Hugging Face transformers (`SiglipModel`, `CLIPModel`).

    python -m flipjax.export --workdir=DIR [--step=N] --output=OUT
"""
