"""The shard format, the only module both stages import.

``contract`` (the clip layout), ``schema`` (sample layout, validation and member digests), ``writer`` (one shard,
atomically, digests recorded), ``reader`` (expansion and iteration), ``ledger`` (index/failure parquet ledgers and
the run directory layout), ``verify`` (a strict check of a whole run), ``cli`` (``shards info|verify``). Free of
vision code on purpose: the student imports it.
"""
