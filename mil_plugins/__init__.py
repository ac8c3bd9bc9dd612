"""mil-plugins: modality-incremental continual learning for LLaVA-style multimodal LLMs.

The data path, one module (or sub-package) per step:

    recipe/      YAML recipe -> validated, registry-resolved settings
    data/        LLaVA manifests, conversation templates, tokenisation, collation
    modality.py  the modality plugin interface (preprocess file -> tensor, encoder -> tokens)
    cache.py     frozen-encoder feature cache
    projectors/  LLaVA-named projectors and checkpoint conversions
    model/       splice modality features into the LLM's input embeddings; generate; save/load
    methods/     continual-learning method hooks
    engine/      the one training loop, stage after stage (plain torch or DeepSpeed)
    evaluate.py  score every seen stage after each stage
    metrics.py   continual-learning metrics over the accuracy matrix
    report.py    metrics.json, report.md, plots
"""

__version__ = "0.1.0"
