"""The training engine: one loop for every backend, run stage after stage.

    context.py      Stage and MethodContext (what method hooks see)
    distributed.py  single process / DeepSpeed launcher: ranks, sharding, gathering, ZeRO config
    trainable.py    trainable groups (llm, lora, connector, encoder, embeddings) -> parameter names
    optim.py        optimiser parameter groups (mm_projector_lr) and LR schedules
    loop.py         the one training loop
    checkpoint.py   atomic checkpoints, resume
    logs.py         JSONL and TensorBoard logs
    session.py      recipe -> plugins, data, tokenizer, model, methods, loaders (and for `mil eval`)
    run.py          the stage runner: train, evaluate, checkpoint, report; the train.py entry
"""
