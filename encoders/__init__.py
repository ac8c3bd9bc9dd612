"""The built-in modality plugins (image, video, audio, depth, point cloud).

Each is a :class:`mil_plugins.modality.ModalityPlugin` declared as an entry point of the
``mil_plugins.modalities`` group in our ``pyproject.toml``, the same way a third-party package
declares its own; see ``docs/modalities.md``. Importing this package imports no plugin.
"""
