"""Shard readers, one per format. They read one sample by (shard, position); the plan of what to
read lives elsewhere (:mod:`es_stream.plan`)."""


def open_reader(corpus):
    """A reader for ``corpus``'s format, to be created in the process that reads."""
    if corpus.format == "mds":
        from .mds import MDSShardReader

        return MDSShardReader(corpus)
    from ..remote.store import reads_by_range

    if any(reads_by_range(s.name) for s in corpus.shards):  # object-store shards, by range
        from ..remote.tar import RemoteTarReader

        return RemoteTarReader(corpus)
    from .wds import WDSShardReader

    return WDSShardReader(corpus)
