"""Integrations of es-stream with training frameworks and other data loaders.

Each needs its framework: :mod:`es_stream.integrations.composer` needs MosaicML Composer
(``pip install 'es-stream[composer]'``), :mod:`es_stream.integrations.streaming_dataset`
mosaicml-streaming (``[mds]``). The es-stream core never imports this package.
"""
