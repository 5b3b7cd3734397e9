"""Integrations of es-stream with training frameworks.

Each submodule needs its framework (``es_stream.integrations.composer`` needs MosaicML Composer:
``pip install 'es-stream[composer]'``); the es-stream core never imports this package.
"""
