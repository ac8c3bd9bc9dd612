"""The plugin kinds' contracts, on the floor below the registry (docs/architecture.md): the method
hook interface (:mod:`~mil_plugins.kinds.method`, :mod:`~mil_plugins.kinds.context`) and the
aggregator base (:mod:`~mil_plugins.kinds.aggregator`). The registry (:mod:`mil_plugins.plugins`)
checks a plugin against them when it loads; their old homes ``mil_plugins.methods.base``,
``mil_plugins.methods.context`` and ``mil_plugins.federated.aggregators`` re-export them.
"""
