"""Integrations: code that speaks another project's formats and classes. Each sub-package is the
only place that imports its project (``llava_fork`` imports LLaVA's own ``llava`` package)."""
