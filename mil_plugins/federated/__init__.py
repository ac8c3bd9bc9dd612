"""Federated multimodal instruction tuning (``mil federate``; docs/federated.md).

``split`` (who holds which data), ``aggregators`` (a plugin kind: fedavg, fedprox, pilot, local),
``params`` (named tensors in and out of a model), ``client`` (one client's local training),
``server`` (rounds, aggregation, evaluation, checkpoints), ``report``. None of these imports
Flower; ``mil_plugins.integrations.flower`` is the only module that does.
"""
