"""Flower (``flwr``): the federated runner's ServerApp and ClientApp (see ``app.py``). The only
package that imports ``flwr``; the rest of ``mil_plugins.federated`` runs without it."""
